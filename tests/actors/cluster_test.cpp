// The cluster: authentication (HMAC challenge-response), placement, supervision, and whole processes — a head
// and two nodes on loopback that run a recipe, lose a node to SIGKILL mid-run and still finish with the
// losses of an undisturbed run.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <spawn.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <optional>
#include <thread>

#include <nlohmann/json.hpp>

#include "actors/cluster/actor_roles.hpp"
#include "actors/cluster/auth.hpp"
#include "actors/cluster/catalog.hpp"
#include "actors/cluster/registry.hpp"
#include "actors/cluster/remote_bench.hpp"
#include "actors/cluster/spawner.hpp"
#include "actors/cluster/supervisor.hpp"
#include "actors/cluster/system.hpp"
#include "actors/envelope.hpp"
#include "actors/roles/data_loader.hpp"
#include "actors/roles/stage_trainer.hpp"
#include "runtime/optim/adamw.hpp"
#include "runtime/recipe/recipe.hpp"
#include "runtime/error.hpp"
#include "runtime/recipe/placement.hpp"
#include "tests/support/run_command.hpp"

extern char** environ;

namespace moerl::cluster {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;
const std::string kMoerl = MOERL_BINARY;

fs::path fresh_dir(const std::string& name) {
  const fs::path dir = fs::temp_directory_path() / ("moerl-cluster-" + name + "-" + std::to_string(getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

void write_secret(const fs::path& file, const std::string& secret) {
  std::ofstream(file) << secret << "\n";
  fs::permissions(file, fs::perms::owner_read | fs::perms::owner_write, fs::perm_options::replace);
}

// A child process of the test (the moerl binary), stdout and stderr into files; killed if still running when
// the test ends, so no test leaves processes behind.
class Child {
 public:
  Child(const std::vector<std::string>& args, const fs::path& log) : out_(log.string() + ".out"), err_(log.string() + ".err") {
    std::vector<char*> argv;
    for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_addopen(&actions, 1, out_.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    posix_spawn_file_actions_addopen(&actions, 2, err_.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    const int rc = posix_spawn(&pid_, args[0].c_str(), &actions, nullptr, argv.data(), environ);
    posix_spawn_file_actions_destroy(&actions);
    if (rc != 0) pid_ = -1;
  }
  ~Child() {
    if (running()) {
      ::kill(pid_, SIGKILL);
      wait(5s);
    }
  }
  bool running() const { return pid_ > 0 && !status_; }
  // The exit code (-signal when killed by a signal), or nothing when it is still running after `timeout`.
  std::optional<int> wait(std::chrono::milliseconds timeout) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    while (!status_ && pid_ > 0) {
      int status = 0;
      const pid_t r = waitpid(pid_, &status, WNOHANG);
      if (r == pid_) status_ = WIFEXITED(status) ? WEXITSTATUS(status) : -WTERMSIG(status);
      else if (std::chrono::steady_clock::now() > deadline) break;
      else std::this_thread::sleep_for(10ms);
    }
    return status_;
  }
  void kill(int signal) { if (running()) ::kill(pid_, signal); }
  std::string out() const { return testing::slurp(out_); }
  std::string err() const { return testing::slurp(err_); }

 private:
  pid_t pid_ = -1;
  std::optional<int> status_;
  fs::path out_, err_;
};

// Polls `ready` every 10 ms until it holds or `timeout` passes.
template <class F>
bool eventually(std::chrono::milliseconds timeout, F&& ready) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (!ready()) {
    if (std::chrono::steady_clock::now() > deadline) return false;
    std::this_thread::sleep_for(10ms);
  }
  return true;
}

uint16_t read_port(const fs::path& file) {
  std::ifstream in(file);
  int port = 0;
  in >> port;
  return static_cast<uint16_t>(port);
}

// ---- authentication ----

TEST(ClusterAuth, ProofDependsOnSecretNameAndBothNonces) {
  const Bytes a = random_bytes(kNonceBytes), b = random_bytes(kNonceBytes);
  const Bytes p = handshake_proof("0123456789abcdef-secret", "moerl-node", "node-a", a, b);
  EXPECT_EQ(p.size(), 32u);
  EXPECT_TRUE(equal_in_constant_time(p, handshake_proof("0123456789abcdef-secret", "moerl-node", "node-a", a, b)));
  EXPECT_FALSE(equal_in_constant_time(p, handshake_proof("0123456789abcdef-secreT", "moerl-node", "node-a", a, b)));
  EXPECT_FALSE(equal_in_constant_time(p, handshake_proof("0123456789abcdef-secret", "moerl-head", "node-a", a, b)));
  EXPECT_FALSE(equal_in_constant_time(p, handshake_proof("0123456789abcdef-secret", "moerl-node", "node-b", a, b)));
  EXPECT_FALSE(equal_in_constant_time(p, handshake_proof("0123456789abcdef-secret", "moerl-node", "node-a", b, a)));
  EXPECT_FALSE(equal_in_constant_time(p, Bytes(p.begin(), p.end() - 1)));
}

TEST(ClusterAuth, HmacMatchesTheRfc4231TestVector) {
  // RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?".
  const std::string data = "what do ya want for nothing?";
  const Bytes mac = hmac_sha256("Jefe", std::span(reinterpret_cast<const uint8_t*>(data.data()), data.size()));
  static const char* kHex = "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843";
  std::string hex;
  for (uint8_t x : mac) hex += "0123456789abcdef"[x >> 4], hex += "0123456789abcdef"[x & 15];
  EXPECT_EQ(hex, kHex);
}

TEST(ClusterAuth, SecretFileMustBePrivateAndLongEnough) {
  const fs::path dir = fresh_dir("secret");
  write_secret(dir / "ok", "0123456789abcdef");
  EXPECT_EQ(read_secret_file(dir / "ok"), "0123456789abcdef");  // the newline is not part of it
  write_secret(dir / "short", "too-short");
  EXPECT_THROW(read_secret_file(dir / "short"), Error);
  write_secret(dir / "open", "0123456789abcdef");
  fs::permissions(dir / "open", fs::perms::group_read | fs::perms::others_read, fs::perm_options::add);
  try {
    read_secret_file(dir / "open");
    ADD_FAILURE() << "a world-readable secret was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("chmod 600"), std::string::npos) << e.what();
  }
  EXPECT_THROW(read_secret_file(dir / "missing"), Error);
  const std::string made = create_secret_file(dir / "made");
  EXPECT_EQ(read_secret_file(dir / "made"), made);
  EXPECT_EQ(made.size(), 64u);  // 32 random bytes in hex
}

// ---- placement ----

TEST(Placement, NamesANodePerRoleWithADefault) {
  const Placement p = parse_placement({"trainer=node-b", "*=node-a", "loader=any"});
  EXPECT_EQ(p.node_for("trainer"), "node-b");
  EXPECT_EQ(p.node_for("rollout"), "node-a");
  EXPECT_EQ(p.node_for("loader"), "");
  EXPECT_EQ(parse_placement({}).node_for("trainer"), "");
  EXPECT_THROW(parse_placement({"trainer"}), Error);
  EXPECT_THROW(parse_placement({"trainer=a", "trainer=b"}), Error);
}

TEST(Placement, IsReadFromARecipeSectionWithLineNumbers) {
  const fs::path dir = fresh_dir("placement");
  std::ofstream(dir / "r.yaml") << "name: x\nplacement:\n  loader: node-a\n  trainer: node-b\n";
  const Placement p = load_placement(dir / "r.yaml");
  EXPECT_EQ(p.node_for("loader"), "node-a");
  EXPECT_EQ(p.node_for("trainer"), "node-b");
  std::ofstream(dir / "bad.yaml") << "name: x\nplacement:\n  loader: [a, b]\n";
  try {
    load_placement(dir / "bad.yaml");
    ADD_FAILURE() << "a list was accepted as a node";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("bad.yaml:3: placement.loader"), std::string::npos) << e.what();
  }
  std::ofstream(dir / "none.yaml") << "name: x\n";
  EXPECT_TRUE(load_placement(dir / "none.yaml").empty());
}

// The recipe both runs train: small enough for seconds, long enough (and checkpointed often enough) that a
// node can be killed mid-run.
fs::path write_recipe(const fs::path& dir) {
  {
    std::ofstream corpus(dir / "corpus.jsonl");
    for (int d = 0; d < 30; ++d) {
      std::string text;
      for (int s = 0; s < 24; ++s)
        text += "the quick brown fox " + std::to_string(d * s % 7) + " jumps over the lazy dog " +
                std::to_string((d + s) % 5) + ". ";
      corpus << nlohmann::json{{"text", text}}.dump() << "\n";
    }
  }
  std::ofstream(dir / "recipe.yaml")
      << "name: cluster-test\nthreads: 1\nseed: 7\ndata:\n  corpus: " << (dir / "corpus.jsonl").string()
      << "\n  vocab_size: 320\n  validation_every: 5\n"
         "model:\n  hidden_size: 48\n  num_hidden_layers: 2\n  kv_lora_rank: 16\n  intermediate_size: 96\n"
         "  n_routed_experts: 4\n  num_experts_per_tok: 2\n  moe_intermediate_size: 32\n  n_group: 1\n"
         "  topk_group: 1\n"
         "stages:\n  - name: pretrain\n    kind: pretrain\n    steps: 120\n    batch: 4\n    seq: 32\n"
         "    eval_every: 40\n    eval_batches: 2\n    checkpoint_every: 10\n";
  return dir / "recipe.yaml";
}

// ---- supervision, in one process ----

// A head (registry + supervisor) and a node joined over loopback, each its own actor system.
NetOptions with_actor_types() {
  NetOptions net;
  net.register_types = [](caf::actor_system_config& cfg) { actors::add_message_types(cfg); };
  return net;
}

RoleCatalog cluster_and_actor_roles() {
  RoleCatalog catalog;
  add_cluster_roles(catalog);
  add_actor_roles(catalog);
  return catalog;
}

struct TwoSystems {
  std::string secret = "an-in-process-test-secret";
  ClusterSystem head_system{with_actor_types()}, node_system{with_actor_types()};
  head_actor registry = spawn_registry(head_system.system(), secret);
  supervisor_actor supervisor;
  spawner_actor spawner;

  TwoSystems() {
    auto port = head_system.publish(registry, 0, "127.0.0.1");
    EXPECT_TRUE(port) << describe(port.error());
    auto head = node_system.connect("127.0.0.1", *port);
    EXPECT_TRUE(head) << describe(head.error());
    const RoleCatalog catalog = cluster_and_actor_roles();
    spawner = spawn_spawner(node_system.system(), catalog, "n1", head->node(), caf::actor_cast<caf::actor>(*head), {});
    auto joined = join_cluster(node_system.system(), *head, secret, "n1", local_resources(catalog), spawner, 5000ms);
    EXPECT_TRUE(joined) << describe(joined.error());
    supervisor = spawn_supervisor(head_system.system(), registry);
  }
  ~TwoSystems() {
    caf::anon_send_exit(supervisor, caf::exit_reason::user_shutdown);
    caf::anon_send_exit(registry, caf::exit_reason::user_shutdown);
    caf::anon_send_exit(spawner, caf::exit_reason::user_shutdown);
  }
};

TEST(Supervisor, RestartsARoleThatDiesAndReportsBothEvents) {
  TwoSystems c;
  caf::scoped_actor self{c.head_system.system()};
  self->send(c.supervisor, subscribe_atom::value, caf::actor_cast<caf::actor>(self));
  caf::actor echo;
  uint32_t incarnation = 0;
  self->request(c.supervisor, 10s, place_atom::value, RoleSpec{"echo", "cluster.echo", "n1", "{}"})
      .receive([&](const caf::actor& a, uint32_t inc) { echo = a, incarnation = inc; },
               [&](caf::error& e) { ADD_FAILURE() << describe(e); });
  ASSERT_TRUE(echo);
  EXPECT_EQ(incarnation, 1u);
  self->receive([](role_up_atom, const std::string& name, const caf::actor&, uint32_t inc, const std::string& node) {
    EXPECT_EQ(name, "echo");
    EXPECT_EQ(inc, 1u);
    EXPECT_EQ(node, "n1");
  });
  // The role answers across the connection, then is killed on its node.
  self->request(caf::actor_cast<echo_actor>(echo), 5s, ping_atom::value, uint64_t{41})
      .receive([](uint64_t x) { EXPECT_EQ(x, 41u); }, [](caf::error& e) { ADD_FAILURE() << describe(e); });
  caf::anon_send_exit(echo, caf::exit_reason::kill);
  self->receive([](role_down_atom, const std::string& name, uint32_t inc, const std::string&) {
    EXPECT_EQ(name, "echo");
    EXPECT_EQ(inc, 1u);
  });
  self->receive([&](role_up_atom, const std::string&, const caf::actor& a, uint32_t inc, const std::string&) {
    EXPECT_EQ(inc, 2u);
    EXPECT_NE(a, echo);
    echo = a;
  });
  self->request(caf::actor_cast<echo_actor>(echo), 5s, ping_atom::value, uint64_t{7})
      .receive([](uint64_t x) { EXPECT_EQ(x, 7u); }, [](caf::error& e) { ADD_FAILURE() << describe(e); });
  // A retired role is stopped and not restarted.
  self->request(c.supervisor, 5s, retire_atom::value, std::string("echo"))
      .receive([](bool was_up) { EXPECT_TRUE(was_up); }, [](caf::error& e) { ADD_FAILURE() << describe(e); });
  self->request(c.supervisor, 5s, lookup_atom::value, std::string("echo"))
      .receive([](const caf::actor&, uint32_t) { ADD_FAILURE() << "a retired role was found"; },
               [](caf::error&) {});
}

TEST(Supervisor, PlacesTheActorRuntimesRolesOnANodeAndRestartsThem) {
  // The data loader and stage trainer of actors/roles/, started on the node through the catalog, answer the
  // head's requests across the connection (their Envelope messages are registered on both sides).
  const fs::path dir = fresh_dir("actor-roles");
  const fs::path recipe_file = write_recipe(dir);
  TwoSystems c;
  caf::scoped_actor self{c.head_system.system()};
  auto place = [&](const std::string& name, const std::string& kind, const std::string& config) {
    caf::actor role;
    self->request(c.supervisor, 30s, place_atom::value, RoleSpec{name, kind, "n1", config})
        .receive([&](const caf::actor& a, uint32_t) { role = a; }, [&](caf::error& e) { ADD_FAILURE() << describe(e); });
    return role;
  };
  const auto loader = caf::actor_cast<actors::data_loader_actor>(
      place("data_loader/0", "roles.data_loader", data_loader_config(recipe_file, {}, dir / "out")));
  ASSERT_TRUE(loader);
  msg::DatasetInfo info;
  self->request(loader, 30s, actors::describe_atom::value)
      .receive([&](actors::Envelope& e) { info = actors::unwrap<msg::DatasetInfo>(e); },
               [&](caf::error& e) { ADD_FAILURE() << describe(e); });
  ASSERT_GT(info.vocab_size, 0u);
  auto trainer = caf::actor_cast<actors::stage_trainer_actor>(
      place("stage_trainer/0", "roles.stage_trainer", stage_trainer_config(recipe_file, {}, dir / "out", info)));
  ASSERT_TRUE(trainer);
  self->request(loader, 30s, actors::open_atom::value, uint32_t{0})
      .receive([](actors::Envelope&) {}, [&](caf::error& e) { ADD_FAILURE() << describe(e); });
  msg::TokenBatch batch;
  self->request(loader, 30s, actors::batch_atom::value, uint64_t{1})
      .receive([&](actors::Envelope& e) { batch = actors::unwrap<msg::TokenBatch>(e); },
               [&](caf::error& e) { ADD_FAILURE() << describe(e); });
  const Recipe recipe = load_recipe(recipe_file);
  const auto train_one = [&](const actors::stage_trainer_actor& t) {
    double loss = -1;
    self->request(t, 30s, actors::begin_atom::value, uint32_t{0}, std::string(), false)
        .receive([](uint64_t applied) { EXPECT_EQ(applied, 0u); }, [&](caf::error& e) { ADD_FAILURE() << describe(e); });
    const msg::TrainStep step{batch.step, {batch}, learning_rate(recipe.stages[0].optimizer, 0)};
    self->request(t, 30s, actors::train_atom::value, actors::wrap(step))
        .receive([&](actors::Envelope& e) { loss = actors::unwrap<msg::TrainStepResult>(e).loss; },
                 [&](caf::error& e) { ADD_FAILURE() << describe(e); });
    return loss;
  };
  const double first = train_one(trainer);
  EXPECT_GT(first, 0);
  // Killed on its node, the trainer comes back (a new incarnation) and trains the same step to the same loss.
  caf::anon_send_exit(trainer, caf::exit_reason::kill);
  uint32_t incarnation = 0;
  EXPECT_TRUE(eventually(10s, [&] {
    self->request(c.supervisor, 10s, lookup_atom::value, std::string("stage_trainer/0"))
        .receive([&](const caf::actor& a, uint32_t inc) { trainer = caf::actor_cast<actors::stage_trainer_actor>(a), incarnation = inc; },
                 [](caf::error&) {});
    return incarnation == 2;
  }));
  EXPECT_EQ(train_one(trainer), first);
  // Both roles are detached actors, and an actor system's destructor waits for every detached actor's thread:
  // retire them (stopped, not restarted) and wait until they are down, so no role is still starting, running or
  // being restarted while the systems shut down (leaving that to the teardown hung about one run in ten).
  for (const auto& [name, role] : {std::pair{std::string("stage_trainer/0"), caf::actor_cast<caf::actor>(trainer)},
                                   std::pair{std::string("data_loader/0"), caf::actor_cast<caf::actor>(loader)}}) {
    self->monitor(role);
    self->request(c.supervisor, 10s, retire_atom::value, name)
        .receive([](bool) {}, [&](caf::error& e) { ADD_FAILURE() << describe(e); });
    self->receive([](const caf::down_msg&) {}, caf::after(10s) >> [&] { ADD_FAILURE() << name << " did not stop"; });
  }
}

TEST(Supervisor, RefusesToStartRolesForActorsOutsideTheHead) {
  TwoSystems c;
  // The node's spawner serves only the head's process; a request from the node's own process is refused.
  caf::scoped_actor self{c.node_system.system()};
  self->request(c.spawner, 5s, spawn_atom::value, RoleSpec{"x", "cluster.echo", "", "{}"})
      .receive([](const caf::actor&) { ADD_FAILURE() << "a role was started for a stranger"; },
               [](caf::error& e) { EXPECT_NE(describe(e).find("only the head"), std::string::npos) << describe(e); });
}

TEST(Registry, RefusesAJoinWithAWrongSecret) {
  ClusterSystem head_system{NetOptions{}}, node_system{NetOptions{}};
  const head_actor registry = spawn_registry(head_system.system(), "the-head-knows-this-secret");
  auto port = head_system.publish(registry, 0, "127.0.0.1");
  ASSERT_TRUE(port);
  auto head = node_system.connect("127.0.0.1", *port);
  ASSERT_TRUE(head);
  RoleCatalog catalog;
  const spawner_actor spawner = spawn_spawner(node_system.system(), catalog, "n1", head->node(), nullptr, {});
  auto joined = join_cluster(node_system.system(), *head, "the-node-has-another-one", "n1",
                             local_resources(catalog), spawner, 5000ms);
  ASSERT_FALSE(joined);
  EXPECT_NE(describe(joined.error()).find("wrong secret"), std::string::npos) << describe(joined.error());
  caf::scoped_actor self{head_system.system()};
  self->request(registry, 5s, nodes_atom::value).receive([](const std::vector<NodeInfo>& nodes) {
    EXPECT_TRUE(nodes.empty());
  }, [](caf::error& e) { ADD_FAILURE() << describe(e); });
  caf::anon_send_exit(registry, caf::exit_reason::user_shutdown);
  caf::anon_send_exit(spawner, caf::exit_reason::user_shutdown);
}

// ---- whole processes ----

TEST(ClusterProcesses, ANodeWithAWrongSecretIsRefusedAndBothSidesSaySo) {
  const fs::path dir = fresh_dir("wrong-secret");
  write_secret(dir / "head.secret", "the-right-secret-0123456789");
  write_secret(dir / "node.secret", "a-wrong-secret-9876543210");
  Child head({kMoerl, "head", "--port", "0", "--port-file", (dir / "port").string(), "--secret-file",
              (dir / "head.secret").string()}, dir / "head");
  ASSERT_TRUE(eventually(20s, [&] { return fs::exists(dir / "port"); })) << head.err();
  const std::string join = "127.0.0.1:" + std::to_string(read_port(dir / "port"));
  Child node({kMoerl, "node", "--join", join, "--name", "intruder", "--secret-file", (dir / "node.secret").string()},
             dir / "node");
  const auto code = node.wait(20s);
  ASSERT_TRUE(code.has_value()) << "the refused node did not exit";
  EXPECT_EQ(*code, 1) << node.err();
  EXPECT_NE(node.err().find("wrong secret"), std::string::npos) << node.err();
  EXPECT_TRUE(eventually(5s, [&] { return head.err().find("refused node 'intruder'") != std::string::npos; }))
      << head.err();
  EXPECT_NE(head.err().find("wrong secret"), std::string::npos) << head.err();
  head.kill(SIGTERM);
  const auto head_code = head.wait(10s);
  ASSERT_TRUE(head_code.has_value()) << "the head did not stop on SIGTERM";
  EXPECT_EQ(*head_code, 0) << head.err();
}

TEST(ClusterProcesses, NodesJoinOverTlsAndAPeerWithoutACertificateIsRefused) {
  const fs::path dir = fresh_dir("tls");
  // A throwaway authority and one certificate it signs, shared by the head and the node.
  const std::string d = dir.string();
  const auto made = testing::run_command(
      "(cd " + d + " && openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 1 -subj /CN=ca && "
      "openssl req -newkey rsa:2048 -nodes -keyout node.key -out node.csr -subj /CN=localhost && "
      "openssl x509 -req -in node.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out node.pem -days 1)");
  if (made.exit_code != 0) GTEST_SKIP() << "no openssl command to make certificates: " << made.err;
  write_secret(dir / "secret", "a-shared-cluster-secret-0123456789");
  const std::vector<std::string> tls = {"--tls-cert", d + "/node.pem", "--tls-key", d + "/node.key", "--tls-ca",
                                        d + "/ca.pem", "--secret-file", d + "/secret"};
  std::vector<std::string> head_args = {kMoerl, "head", "--port", "0", "--port-file", d + "/port"};
  head_args.insert(head_args.end(), tls.begin(), tls.end());
  Child head(head_args, dir / "head");
  ASSERT_TRUE(eventually(20s, [&] { return fs::exists(dir / "port"); })) << head.err();
  const std::string join = "127.0.0.1:" + std::to_string(read_port(dir / "port"));
  std::vector<std::string> node_args = {kMoerl, "node", "--join", join, "--name", "t"};
  node_args.insert(node_args.end(), tls.begin(), tls.end());
  Child node(node_args, dir / "node");
  EXPECT_TRUE(eventually(20s, [&] { return head.err().find("node 't' (") != std::string::npos; })) << head.err();
  EXPECT_NE(head.err().find("(TLS)"), std::string::npos) << head.err();
  // Plain TCP against the TLS port: the TLS handshake fails, the peer never reaches the join.
  Child plain({kMoerl, "node", "--join", join, "--name", "p", "--connect-timeout-s", "0", "--secret-file",
               d + "/secret"}, dir / "plain");
  EXPECT_EQ(plain.wait(20s).value_or(-1), 1) << plain.err();
  EXPECT_EQ(head.err().find("node 'p' ("), std::string::npos) << head.err();
  // libcaf-openssl 0.17.6 may drop the live TLS connection when another handshake fails, and the node's rejoin
  // over TLS can then time out (seen in CI: "refused by the head: request_timeout"); a known defect, not
  // asserted here. What is asserted: the TLS join worked, the plain peer never joined, the head stops cleanly.
  head.kill(SIGTERM);
  EXPECT_EQ(head.wait(10s).value_or(-1), 0) << head.err();
  if (!node.wait(10s)) node.kill(SIGKILL);
}

TEST(ClusterProcesses, RemoteRoundTripBenchmarkTimesRequestsToARealNode) {
  // A smoke run of `moerl bench actors`' roundtrip_remote_us with few samples: it starts a node process, times
  // round trips to its echo role and ends it, with both processes blocking when idle and with both polling after
  // activity (--idle-spin-us passed to the node). The timing itself is the benchmark's business, not a test's.
  for (const auto spin : {std::chrono::microseconds{0}, std::chrono::microseconds{300}}) {
    const RemoteRoundTrip r = measure_remote_roundtrip(kMoerl, 200, 50, "sharing", spin);
    EXPECT_EQ(r.samples, 200);
    EXPECT_GT(r.median_us, 0);
    EXPECT_LE(r.p10_us, r.median_us);
    EXPECT_LE(r.median_us, r.p90_us);
  }
}

struct ClusterRun {
  nlohmann::json summary;
  std::string head_err;
};

// A head (no roles of its own) and nodes a and b; the loader starts on a, the trainer on b. With
// `kill_b_at_step`, node b is killed with SIGKILL once the run has logged that step.
ClusterRun run_cluster(const fs::path& dir, const fs::path& recipe, const std::string& out,
                       std::optional<int> kill_b_at_step) {
  write_secret(dir / "secret", "a-shared-cluster-secret-0123456789");
  fs::remove(dir / ("port-" + out));
  Child head({kMoerl, "head", "--port", "0", "--port-file", (dir / ("port-" + out)).string(), "--secret-file",
              (dir / "secret").string(), "--no-local-roles", "--run", recipe.string(), "--out", (dir / out).string(),
              "--nodes", "2", "--placement", "loader=a", "--placement", "trainer=b", "--wait-s", "30"},
             dir / ("head-" + out));
  EXPECT_TRUE(eventually(20s, [&] { return fs::exists(dir / ("port-" + out)); })) << head.err();
  const std::string join = "127.0.0.1:" + std::to_string(read_port(dir / ("port-" + out)));
  Child a({kMoerl, "node", "--join", join, "--name", "a", "--secret-file", (dir / "secret").string()},
          dir / ("a-" + out));
  Child b({kMoerl, "node", "--join", join, "--name", "b", "--secret-file", (dir / "secret").string()},
          dir / ("b-" + out));
  if (kill_b_at_step) {
    const fs::path metrics = dir / out / "metrics.jsonl";
    const bool reached = eventually(40s, [&] {
      return testing::slurp(metrics).find("\"step\":" + std::to_string(*kill_b_at_step) + ",") != std::string::npos;
    });
    EXPECT_TRUE(reached) << head.err();
    b.kill(SIGKILL);
  }
  const auto code = head.wait(50s);
  EXPECT_TRUE(code.has_value()) << "the head did not finish:\n" << head.err();
  EXPECT_EQ(code.value_or(-1), 0) << head.err();
  // The head ends the cluster: the surviving nodes exit 0.
  EXPECT_EQ(a.wait(10s).value_or(-1), 0) << a.err();
  if (!kill_b_at_step) {
    EXPECT_EQ(b.wait(10s).value_or(-1), 0) << b.err();
  }
  ClusterRun r;
  r.head_err = head.err();
  if (code == 0) r.summary = nlohmann::json::parse(head.out());
  return r;
}

TEST(ClusterProcesses, ARunSurvivesTheLossOfANodeWithTheLossesOfAnUndisturbedRun) {
  const fs::path dir = fresh_dir("run");
  const fs::path recipe = write_recipe(dir);
  const ClusterRun calm = run_cluster(dir, recipe, "calm", std::nullopt);
  const ClusterRun hit = run_cluster(dir, recipe, "hit", 35);
  ASSERT_FALSE(calm.summary.is_null());
  ASSERT_FALSE(hit.summary.is_null());
  const auto& c = calm.summary["stages"][0];
  const auto& h = hit.summary["stages"][0];
  EXPECT_EQ(c["steps"], 120);
  EXPECT_EQ(h["steps"], 120);
  EXPECT_EQ(c["restarts"], 0);
  EXPECT_GE(h["restarts"].get<int>(), 1) << hit.head_err;
  // Resuming from a checkpoint is bit-exact (runtime/train/checkpoint.hpp), and every step is applied once:
  // the same losses to the last bit, not merely close ones.
  EXPECT_EQ(c["train_loss"].get<double>(), h["train_loss"].get<double>());
  EXPECT_EQ(c["validation_loss"].get<double>(), h["validation_loss"].get<double>());
  // The trainer came back on the surviving node, from its checkpoint.
  EXPECT_NE(hit.head_err.find("role trainer.pretrain on node 'b' died"), std::string::npos) << hit.head_err;
  EXPECT_NE(hit.head_err.find("role trainer.pretrain (cluster.trainer) up on node 'a' (restart 1)"), std::string::npos)
      << hit.head_err;
  EXPECT_NE(hit.head_err.find("left after"), std::string::npos) << hit.head_err;
  EXPECT_EQ(hit.head_err.find("not deterministic"), std::string::npos) << hit.head_err;
  // Every step is in the metrics once.
  std::ifstream metrics(dir / "hit" / "metrics.jsonl");
  std::string line;
  int steps = 0;
  while (std::getline(metrics, line)) steps += nlohmann::json::parse(line).contains("step");
  EXPECT_EQ(steps, 120);
}

}  // namespace
}  // namespace moerl::cluster
