#include "actors/cluster/remote_bench.hpp"

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <thread>
#include <vector>

#include "actors/cluster/auth.hpp"
#include "actors/cluster/registry.hpp"
#include "actors/cluster/system.hpp"
#include "runtime/error.hpp"
#include "runtime/util/spawn.hpp"

namespace moerl::cluster {
namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

namespace {

using go_atom = caf::atom_constant<caf::atom("go")>;

// Sends ping after ping to `echo`, each when the previous answer arrived; replies with the round trips (ns).
struct PingerState {
  PingerState() = default;  // not an aggregate: CAF would construct it from the actor pointer
  echo_actor echo;
  int remaining = 0, warmup = 0;
  Clock::time_point sent;
  std::vector<double> ns;
  caf::response_promise promise;
};

// Each request carries a timeout, as the cluster's own requests do. With CAF's own actor clock that woke the
// clock's thread twice per request (set and cancel), ~60 us of a ~210 us median on the loaded 2-core machine;
// cluster processes use the quiet clock (quiet_clock.hpp), which is not woken for these.
void ping(caf::stateful_actor<PingerState>* self) {
  auto& st = self->state;
  st.sent = Clock::now();
  self->request(st.echo, std::chrono::seconds(10), ping_atom::value, uint64_t{42})
      .then(
          [self](uint64_t) {
            auto& st = self->state;
            const double ns = std::chrono::duration<double, std::nano>(Clock::now() - st.sent).count();
            if (st.warmup > 0) --st.warmup;
            else st.ns.push_back(ns), --st.remaining;
            if (st.remaining > 0) ping(self);
            else st.promise.deliver(st.ns), self->quit();
          },
          [self](caf::error& e) {
            self->state.promise.deliver(e);
            self->quit();
          });
}

caf::behavior pinger(caf::stateful_actor<PingerState>* self, echo_actor echo, int samples, int warmup) {
  self->state.echo = echo;
  self->state.remaining = samples;
  self->state.warmup = warmup;
  self->state.ns.reserve(static_cast<size_t>(samples));
  return {[self](go_atom) -> caf::response_promise {
    self->state.promise = self->make_response_promise();
    ping(self);
    return self->state.promise;
  }};
}

}  // namespace

RemoteRoundTrip measure_remote_roundtrip(const std::string& moerl_binary, int samples, int warmup,
                                         const std::string& scheduler, std::chrono::microseconds idle_spin) {
  const fs::path dir = fs::temp_directory_path() / ("moerl-bench-remote-" + std::to_string(getpid()));
  fs::create_directories(dir);
  const std::string secret = create_secret_file(dir / "secret");
  NetOptions net;
  net.scheduler = scheduler;
  net.idle_spin = idle_spin;
  ClusterSystem cluster{net};
  caf::actor_system& system = cluster.system();
  const head_actor registry = spawn_registry(system, secret);
  auto port = cluster.publish(registry, 0, "127.0.0.1");
  require(static_cast<bool>(port), "bench: cannot listen on loopback: " + (port ? "" : describe(port.error())));

  const std::string join = "127.0.0.1:" + std::to_string(*port), secret_file = (dir / "secret").string(),
                    log = (dir / "node.log").string();
  std::vector<std::string> args = {moerl_binary, "node",        "--join",      join,       "--name",
                                   "bench",      "--secret-file", secret_file, "--scheduler", scheduler,
                                   "--idle-spin-us", std::to_string(idle_spin.count())};
  const pid_t pid = spawn_program(args, log);

  RemoteRoundTrip out;
  std::string failure;
  {
    caf::scoped_actor self{system};
    caf::actor echo;
    const auto deadline = Clock::now() + std::chrono::seconds(30);
    while (!echo && failure.empty()) {
      self->request(registry, std::chrono::seconds(10), spawn_atom::value, std::string("bench"),
                    RoleSpec{"echo", "cluster.echo", "bench", "{}"})
          .receive([&](const caf::actor& a) { echo = a; }, [&](caf::error& e) {
            if (Clock::now() > deadline) failure = "the bench node did not join within 30 s: " + describe(e);
          });
      if (!echo && failure.empty()) std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    if (echo) {
      const caf::actor p = system.spawn(pinger, caf::actor_cast<echo_actor>(echo), samples, warmup);
      self->request(p, caf::infinite, go_atom::value)
          .receive(
              [&](std::vector<double>& ns) {
                std::sort(ns.begin(), ns.end());
                auto at = [&](double q) { return ns[static_cast<size_t>(q * static_cast<double>(ns.size() - 1))] / 1000; };
                out = RemoteRoundTrip{at(0.5), at(0.1), at(0.9), static_cast<int>(ns.size())};
              },
              [&](caf::error& e) { failure = "round trip failed: " + describe(e); });
    }
    self->send(registry, shutdown_atom::value, std::string("the benchmark is done"));
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  caf::anon_send_exit(registry, caf::exit_reason::user_shutdown);
  int status = 0;
  for (int i = 0; i < 100 && waitpid(pid, &status, WNOHANG) == 0; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  if (waitpid(pid, &status, WNOHANG) == 0) {
    kill(pid, SIGKILL);
    waitpid(pid, &status, 0);
  }
  fs::remove_all(dir);
  require(failure.empty(), "bench roundtrip_remote_us: " + failure);
  return out;
}

}  // namespace moerl::cluster
