// Runs body(rank) for ranks 0 .. ranks-1, each on its own thread; rethrows the first failure (by rank) after all
// have finished, so a failing rank never leaves its peers' threads running past the test.
#pragma once
#include <exception>
#include <functional>
#include <thread>
#include <vector>

namespace moerl::test {

inline void on_threads(int ranks, const std::function<void(int)>& body) {
  std::vector<std::exception_ptr> errors(static_cast<size_t>(ranks));
  std::vector<std::thread> threads;
  for (int r = 0; r < ranks; ++r)
    threads.emplace_back([&, r] {
      try {
        body(r);
      } catch (...) {
        errors[static_cast<size_t>(r)] = std::current_exception();
      }
    });
  for (auto& t : threads) t.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
}

}  // namespace moerl::test
