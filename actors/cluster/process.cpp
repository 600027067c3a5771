#include "actors/cluster/process.hpp"

#include <unistd.h>

#include <condition_variable>
#include <csignal>
#include <cstdlib>
#include <cstdio>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>

#include "actors/cluster/registry.hpp"
#include "actors/cluster/spawner.hpp"
#include "actors/cluster/supervisor.hpp"
#include "runtime/error.hpp"
#include "runtime/util/files.hpp"

namespace moerl::cluster {
namespace fs = std::filesystem;

namespace {

volatile std::sig_atomic_t g_stop_signal = 0;

extern "C" void on_stop_signal(int signal) { g_stop_signal = signal; }

std::string load_or_create_secret(const fs::path& given, bool create) {
  const fs::path file = given.empty() ? fs::path(kDefaultSecretFile) : given;
  if (fs::exists(file) || !create) {
    if (!fs::exists(file) && given.empty())
      throw Error(std::string(kDefaultSecretFile) + ": no cluster secret here; pass --secret-file (the head writes "
                                                    "one when it starts without)");
    return read_secret_file(file);
  }
  const std::string secret = create_secret_file(file);
  log_line("moerl head: wrote a new cluster secret to " + fs::absolute(file).string() +
           " (mode 600); nodes join with --secret-file " + fs::absolute(file).string());
  return secret;
}

// Waits for a hook to fire or a stop signal; returns the hook's (reason, lost) or ("signal", false).
// The hook shares the state: a spawner may still call it after the Ending that made it is gone (the registry's
// shutdown reaches the head's own spawner after the head has stopped waiting), which must not touch a freed mutex.
class Ending {
 public:
  ShutdownHook hook() {
    return [state = state_](const std::string& reason, bool lost) {
      std::lock_guard<std::mutex> lock(state->mutex);
      if (state->done) return;
      state->done = true, state->reason = reason, state->lost = lost;
      state->cv.notify_all();
    };
  }
  // Blocks until ended; true when a stop signal arrived first.
  bool wait() {
    std::unique_lock<std::mutex> lock(state_->mutex);
    while (!state_->done) {
      if (g_stop_signal) return true;
      state_->cv.wait_for(lock, std::chrono::milliseconds(100));
    }
    return false;
  }
  std::string reason() const {
    std::lock_guard<std::mutex> lock(state_->mutex);
    return state_->reason;
  }
  bool lost() const {
    std::lock_guard<std::mutex> lock(state_->mutex);
    return state_->lost;
  }

 private:
  struct State {
    std::mutex mutex;
    std::condition_variable cv;
    bool done = false, lost = false;
    std::string reason;
  };
  std::shared_ptr<State> state_ = std::make_shared<State>();
};

int remote_nodes_alive(caf::actor_system& system, const head_actor& registry) {
  caf::scoped_actor self{system};
  int alive = 0;
  self->request(registry, std::chrono::seconds(5), nodes_atom::value)
      .receive(
          [&](const std::vector<NodeInfo>& nodes) {
            for (const NodeInfo& n : nodes) alive += n.alive && !n.local;
          },
          [](caf::error&) {});
  return alive;
}

}  // namespace

void install_stop_signals() {
  struct sigaction sa {};
  sa.sa_handler = on_stop_signal;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGINT, &sa, nullptr);
  sigaction(SIGTERM, &sa, nullptr);
}

LocalCluster start_local_cluster(caf::actor_system& system, const RoleCatalog& catalog, const std::string& name,
                                 SupervisorOptions options) {
  std::string secret;
  for (uint8_t b : random_bytes(32)) secret += static_cast<char>('a' + b % 26);
  LocalCluster c;
  c.registry = spawn_registry(system, secret);
  c.spawner = spawn_spawner(system, catalog, name, system.node(), nullptr, {});
  auto joined = join_cluster(system, c.registry, secret, name, local_resources(catalog), c.spawner,
                             std::chrono::seconds(10));
  if (!joined) {
    c.stop();
    throw Error("the local cluster could not register its node: " + describe(joined.error()));
  }
  c.supervisor = spawn_supervisor(system, c.registry, options);
  return c;
}

void LocalCluster::stop() {
  if (supervisor) caf::anon_send_exit(supervisor, caf::exit_reason::user_shutdown);
  if (spawner) caf::anon_send_exit(spawner, caf::exit_reason::user_shutdown);
  if (registry) caf::anon_send_exit(registry, caf::exit_reason::user_shutdown);
}

namespace {

// How long a finished head or node waits for its actor system to stop. CAF's destructor waits for every actor
// and connection; one stuck on a peer that is already gone must not keep a finished process alive (every
// result that matters is already on disk: checkpoints, metrics, the summary on stdout).
constexpr auto kShutdownGrace = std::chrono::seconds(5);

// Runs `body` on a fresh ClusterSystem and returns its exit code (or rethrows its error) once the system has
// stopped, or exits the process with that code after kShutdownGrace.
template <class Body>
int with_bounded_shutdown(const NetOptions& net, const std::string& who, Body body) {
  auto cluster = std::make_unique<ClusterSystem>(net);
  int code = 1;
  std::exception_ptr failure;
  std::string failure_text;
  try {
    code = body(*cluster);
  } catch (const std::exception& e) {
    failure = std::current_exception(), failure_text = e.what();
  } catch (...) {
    failure = std::current_exception(), failure_text = "unknown error";
  }
  std::thread([who, code, failure_text] {
    std::this_thread::sleep_for(kShutdownGrace);
    if (!failure_text.empty()) std::fprintf(stderr, "error: %s\n", failure_text.c_str());
    log_line(who + ": actors still stopping " + std::to_string(kShutdownGrace.count()) + " s after the end; exiting");
    std::fflush(nullptr);
    std::_Exit(code);
  }).detach();
  cluster.reset();
  if (failure) std::rethrow_exception(failure);
  return code;
}

int run_head_in(ClusterSystem& cluster, const HeadOptions& options) {
  const std::string secret = load_or_create_secret(options.secret_file, true);
  require(valid_name(options.name), "--name " + options.name + ": expected [A-Za-z0-9._-], 1..64 characters");
  caf::actor_system& system = cluster.system();
  const head_actor registry = spawn_registry(system, secret);
  auto port = cluster.publish(registry, options.port, options.host);
  if (!port) {
    caf::anon_send_exit(registry, caf::exit_reason::user_shutdown);
    throw Error("--port " + std::to_string(options.port) + ": cannot listen on " + options.host + ": " +
                describe(port.error()));
  }
  if (!options.port_file.empty()) write_file_durably(options.port_file, std::to_string(*port) + "\n");
  log_line("moerl head: listening on " + options.host + ":" + std::to_string(*port) +
           (options.net.tls.enabled() ? " (TLS)" : " (plain TCP; --tls-cert/--tls-key/--tls-ca for TLS)"));

  Ending ending;
  spawner_actor local;
  if (options.local_roles) {
    local = spawn_spawner(system, options.catalog, options.name, system.node(), nullptr, ending.hook());
    auto joined = join_cluster(system, registry, secret, options.name, local_resources(options.catalog), local,
                               std::chrono::seconds(10));
    require(static_cast<bool>(joined), "the head could not register its own roles: " +
                                           (joined ? std::string() : describe(joined.error())));
  }
  const supervisor_actor supervisor = spawn_supervisor(system, registry);
  auto end_cluster = [&](const std::string& reason) {
    caf::scoped_actor self{system};
    self->request(supervisor, std::chrono::seconds(10), stop_atom::value).receive([](uint32_t) {}, [](caf::error&) {});
    self->send(registry, shutdown_atom::value, reason);
    // Wait until every node's spawner has ended (the registry sees it go down): a connection closed before its
    // node read the shutdown would look like a lost head, and the node would try to rejoin.
    const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(5);
    while (remote_nodes_alive(system, registry) > 0 && std::chrono::steady_clock::now() < until)
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    caf::anon_send_exit(supervisor, caf::exit_reason::user_shutdown);
    caf::anon_send_exit(registry, caf::exit_reason::user_shutdown);
    if (local) caf::anon_send_exit(local, caf::exit_reason::user_shutdown);
  };

  if (!options.run) {
    ending.wait();
    log_line("moerl head: stopping the cluster");
    end_cluster("the head was stopped");
    return 0;
  }
  const auto deadline = std::chrono::steady_clock::now() + options.wait_timeout;
  int alive = 0;
  while ((alive = remote_nodes_alive(system, registry)) < options.wait_nodes) {
    if (std::chrono::steady_clock::now() > deadline || g_stop_signal) {
      end_cluster("the head gave up waiting for nodes");
      throw Error("--nodes " + std::to_string(options.wait_nodes) + ": only " + std::to_string(alive) +
                  " nodes joined within " + std::to_string(options.wait_timeout.count()) + " s");
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  nlohmann::json summary;
  try {
    summary = run_on_cluster(system, supervisor, *options.run);
  } catch (...) {
    end_cluster("the run failed");
    throw;
  }
  std::printf("%s\n", summary.dump(2).c_str());
  std::fflush(stdout);
  end_cluster("the run is complete");
  return 0;
}

int run_node_in(ClusterSystem& cluster, const NodeOptions& options) {
  const std::string secret = load_or_create_secret(options.secret_file, false);
  std::string name = options.name;
  if (name.empty()) {
    char host[128] = {};
    gethostname(host, sizeof host - 1);
    name = std::string(host) + "-" + std::to_string(getpid());
    for (char& c : name)
      if (!valid_name(std::string(1, c))) c = '-';
  }
  require(valid_name(name), "--name " + name + ": expected [A-Za-z0-9._-], 1..64 characters");
  const std::string where = options.host + ":" + std::to_string(options.port);
  caf::actor_system& system = cluster.system();
  const std::string who = "moerl node " + name;

  auto deadline = std::chrono::steady_clock::now() + options.connect_timeout;
  for (bool rejoining = false;; rejoining = true) {
    caf::expected<head_actor> head = make_cluster_error("not connected");
    for (bool first = true;; first = false) {
      head = cluster.connect(options.host, options.port);
      if (head || std::chrono::steady_clock::now() > deadline || g_stop_signal) break;
      if (first) log_line(who + ": no head at " + where + " yet (" + describe(head.error()) + "); retrying");
      std::this_thread::sleep_for(std::chrono::milliseconds(250));
    }
    if (!head) {
      if (!rejoining) throw Error("--join " + where + ": cannot reach the head: " + describe(head.error()));
      log_line(who + ": gave up rejoining the head at " + where + ": " + describe(head.error()));
      return 1;
    }
    Ending ending;
    const spawner_actor spawner = spawn_spawner(system, options.catalog, name, head->node(),
                                                caf::actor_cast<caf::actor>(*head), ending.hook());
    auto joined = join_cluster(system, *head, secret, name, local_resources(options.catalog), spawner,
                               std::chrono::seconds(10));
    if (!joined) {
      caf::anon_send_exit(spawner, caf::exit_reason::user_shutdown);
      const std::string why = describe(joined.error());
      log_line(who + ": refused by the head at " + where + ": " + why);
      // Rejoining, the head may not have noticed yet that the old connection is gone (name taken): retry.
      if (rejoining && why.find("wrong secret") == std::string::npos &&
          std::chrono::steady_clock::now() < deadline) {
        std::this_thread::sleep_for(std::chrono::milliseconds(500));
        continue;
      }
      return 1;
    }
    log_line(who + (rejoining ? ": rejoined the cluster at " : ": joined the cluster at ") + where);
    if (ending.wait()) {
      log_line(who + ": stopping on a signal");
      caf::anon_send_exit(spawner, caf::exit_reason::user_shutdown);
      return 0;
    }
    log_line(who + ": " + ending.reason());
    if (!ending.lost()) return 0;
    if (!options.rejoin) return 1;
    // Its roles are stopped (the head restarts them elsewhere); the node offers itself again.
    log_line(who + ": trying to rejoin for " + std::to_string(options.connect_timeout.count()) + " s");
    deadline = std::chrono::steady_clock::now() + options.connect_timeout;
  }
}

}  // namespace

int run_head(const HeadOptions& options) {
  return with_bounded_shutdown(options.net, "moerl head",
                               [&](ClusterSystem& cluster) { return run_head_in(cluster, options); });
}

int run_node(const NodeOptions& options) {
  return with_bounded_shutdown(options.net, "moerl node " + options.name,
                               [&](ClusterSystem& cluster) { return run_node_in(cluster, options); });
}

}  // namespace moerl::cluster
