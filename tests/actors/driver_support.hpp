// What the driver tests share: reading a run's per-step metrics and running a recipe on a driver while
// killing one of its children.
#pragma once
#include <functional>
#include <thread>

#include <nlohmann/json.hpp>

#include "actors/roles/driver.hpp"
#include "tests/actors/support.hpp"

namespace moerl::actors::testing {

// The per-step lines of a run's metrics.jsonl (those with "step" and "loss"), in file order.
inline std::vector<nlohmann::json> step_metrics(const fs::path& file) {
  std::vector<nlohmann::json> out;
  std::ifstream f(file);
  std::string line;
  while (std::getline(f, line)) {
    auto j = nlohmann::json::parse(line, nullptr, false);  // a line being written is skipped
    if (!j.is_discarded() && j.contains("loss") && j.contains("step")) out.push_back(std::move(j));
  }
  return out;
}

// Runs `file` (with `overrides`) into `out` on a fresh driver and kills the driver's child `victim` up to
// `times` times, each time once ready() holds and the child is a new one (the restarted actor). Returns the
// run's failure ("" when it finished); `*kills` counts the kills made.
inline std::string run_and_kill(const fs::path& file, const std::vector<std::string>& overrides,
                                const fs::path& out, const std::string& victim, int times,
                                const std::function<bool()>& ready, int* kills) {
  caf::actor_system system{test_config()};
  auto driver = spawn_driver(system);
  caf::scoped_actor runner{system}, killer{system};
  struct Stop {  // the driver goes on every path out, so the actor system can shut down
    caf::scoped_actor& self;
    driver_actor driver;
    ~Stop() { self->send_exit(driver, caf::exit_reason::user_shutdown); }
  } stop{killer, driver};
  auto pending = runner->request(driver, std::chrono::seconds(60), run_atom::value, file.string(), overrides,
                                 out.string());
  *kills = 0;
  caf::actor last;
  std::string failure;
  const auto deadline = std::chrono::steady_clock::now() + kReplyTimeout;
  while (*kills < times && !fs::exists(out / "summary.json") && std::chrono::steady_clock::now() < deadline) {
    const auto child = ask<caf::actor>(killer, driver, nullptr, lookup_atom::value, victim);
    if (!child) break;  // the driver is gone
    if (*child && *child != last && ready()) {
      caf::anon_send_exit(*child, caf::exit_reason::kill);
      last = *child;
      ++*kills;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  pending.receive([&](std::string&, std::string&) {}, [&](caf::error& e) { failure = describe(e); });
  return failure;
}

}  // namespace moerl::actors::testing
