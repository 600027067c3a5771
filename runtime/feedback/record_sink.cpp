// submit_and_wait: a RecordSink's answer awaited on the caller's thread.
#include "runtime/feedback/record_sink.hpp"

#include <future>
#include <memory>

#include "runtime/error.hpp"

namespace moerl::feedback {

store::Key submit_and_wait(RecordSink& sink, store::Family family, uint64_t time_ns, std::vector<uint8_t> bytes) {
  auto answer = std::make_shared<std::promise<std::pair<store::Key, std::string>>>();
  auto future = answer->get_future();
  sink.submit(family, time_ns, std::move(bytes),
              [answer](const store::Key& key, const std::string& error) { answer->set_value({key, error}); });
  auto [key, error] = future.get();
  if (!error.empty()) throw Error(sink.name() + ": " + error);
  return key;
}

}  // namespace moerl::feedback
