// The feedback page in headless Chromium (Debian's chromium + chromium-driver, installed by scripts/setup.sh),
// driven over the W3C WebDriver protocol by a small client on httplib: log in with a token, judge one pair
// by clicking and one by the keyboard, then find both records in the store.
#include <gtest/gtest.h>
#include <httplib.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <thread>

#include "runtime/feedback/server_process.hpp"
#include "runtime/messages/codec.hpp"
#include "runtime/store/durable_store.hpp"
#include "tests/feedback/temp_dir.hpp"

namespace moerl::feedback {
namespace {

using nlohmann::json;
constexpr const char* kElement = "element-6066-11e4-a52e-4f735466cecf";  // the W3C web element identifier

int free_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr);
  socklen_t len = sizeof addr;
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  ::close(fd);
  return ntohs(addr.sin_port);
}

class WebDriver {
 public:
  WebDriver(const std::string& chromedriver, const std::string& chromium) : port_(free_port()), http_("127.0.0.1", port_) {
    pid_ = ::fork();
    if (pid_ == 0) {
      const std::string port = "--port=" + std::to_string(port_);
      ::execl(chromedriver.c_str(), chromedriver.c_str(), port.c_str(), "--log-level=OFF", static_cast<char*>(nullptr));
      ::_exit(127);
    }
    try {
      start(chromium);
    } catch (...) {  // the destructor will not run: stop chromedriver here
      ::kill(pid_, SIGTERM);
      ::waitpid(pid_, nullptr, 0);
      throw;
    }
  }
  void start(const std::string& chromium) {
    http_.set_connection_timeout(2);
    http_.set_read_timeout(30);  // every WebDriver call answers within this or the test fails
    bool up = false;
    for (int i = 0; i < 100 && !up; ++i) {  // up to 10 s for chromedriver to listen
      const auto r = http_.Get("/status");
      up = r && r->status == 200;
      if (!up) std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    if (!up) throw std::runtime_error("chromedriver did not answer on port " + std::to_string(port_) + " within 10 s");
    const json caps = {{"capabilities",
                        {{"alwaysMatch",
                          {{"browserName", "chrome"},
                           {"goog:chromeOptions",
                            {{"binary", chromium},
                             {"args", {"--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                                       "--no-first-run", "--user-data-dir=" + profile_.path()}}}}}}}}};
    const json r = call("POST", "/session", caps);
    if (!r["value"].is_object() || !r["value"].contains("sessionId") || !r["value"]["sessionId"].is_string())
      throw std::runtime_error("webdriver: no session: " + r.dump().substr(0, 400));
    session_ = r["value"]["sessionId"].get<std::string>();
  }
  ~WebDriver() {
    if (!session_.empty()) http_.Delete("/session/" + session_);  // closes chromium
    ::kill(pid_, SIGTERM);
    ::waitpid(pid_, nullptr, 0);
  }
  // Presses `key` as a person would (W3C actions: key down and up, sent to the focused element).
  void press(const std::string& key) {
    const json actions = {{"actions", {{{"type", "key"}, {"id", "keyboard"},
                                        {"actions", {{{"type", "keyDown"}, {"value", key}}, {{"type", "keyUp"}, {"value", key}}}}}}}};
    call("POST", at("/actions"), actions);
  }
  void go(const std::string& url) { call("POST", at("/url"), {{"url", url}}); }
  std::string find(const std::string& css) {
    const json v = call("POST", at("/element"), {{"using", "css selector"}, {"value", css}})["value"];
    if (!v.is_object() || !v.contains(kElement) || !v[kElement].is_string())
      throw std::runtime_error("webdriver: no element reference for " + css + ": " + v.dump().substr(0, 200));
    return v[kElement].get<std::string>();
  }
  void click(const std::string& css) { call("POST", at("/element/" + find(css) + "/click"), json::object()); }
  void type(const std::string& css, const std::string& text) {
    call("POST", at("/element/" + find(css) + "/value"), {{"text", text}});
  }
  std::string text(const std::string& css) {
    const json v = call("GET", at("/element/" + find(css) + "/text"), {})["value"];
    return v.is_string() ? v.get<std::string>() : std::string();
  }
  // Polls until the element's text is `expected` (the page updates after its fetches), up to 10 s.
  bool wait_text(const std::string& css, const std::string& expected) {
    for (int i = 0; i < 100; ++i) {
      if (text(css) == expected) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    return false;
  }

 private:
  std::string at(const std::string& path) const { return "/session/" + session_ + path; }
  json call(const std::string& method, const std::string& path, const json& body) {
    auto r = method == "GET" ? http_.Get(path) : http_.Post(path, body.dump(), "application/json");
    if (!r) throw std::runtime_error("webdriver: no answer to " + method + " " + path);
    json j = json::parse(r->body, nullptr, false);
    if (r->status != 200 || !j.is_object() || !j.contains("value"))
      throw std::runtime_error("webdriver: " + method + " " + path + " -> " + r->body.substr(0, 400));
    return j;
  }
  test::TempDir profile_;
  int port_;
  pid_t pid_ = -1;
  httplib::Client http_;
  std::string session_;
};

// Stops the server (SIGTERM: the store closes) when the scope ends, also after a failed assertion.
struct Stopper {
  ServerProcess server;
  void stop() {
    if (server.pid > 0) stop_server(server, SIGTERM);
    server.pid = -1;
  }
  ~Stopper() { stop(); }
};

TEST(FeedbackPage, JudgesPairsByClickAndByKeyboardInHeadlessChromium) {
  const std::string chromedriver = "/usr/bin/chromedriver", chromium = "/usr/bin/chromium";
  // Not a skip: CI must run this test, and scripts/setup.sh installs both.
  ASSERT_TRUE(std::filesystem::exists(chromedriver) && std::filesystem::exists(chromium))
      << "the browser test needs Debian's chromium and chromium-driver: apt-get install -y chromium chromium-driver "
         "(scripts/setup.sh installs them)";
  test::TempDir dir;
  const std::string admin = "admin-token-0123456789abcdef";
  const auto annotators = write_test_tokens(dir.path() + "/tokens", admin, 1);
  Stopper stopper{start_server(MOERL_BINARY, dir.path() + "/db", dir.path() + "/tokens")};
  const ServerProcess server = stopper.server;
  {
    httplib::Client client("127.0.0.1", server.port);
    client.set_bearer_token_auth(admin.c_str());
    for (const char* p : {R"({"prompt": "Capital of France?", "first": "Paris", "second": "Lyon"})",
                          R"({"prompt": "2 + 2?", "first": "5", "second": "4"})"})
    {
      const auto r = client.Post("/api/v1/pairs", p, "application/json");
      ASSERT_TRUE(r && r->status == 201) << (r ? r->body : "no answer");
    }
  }
  {
    WebDriver browser(chromedriver, chromium);
    browser.go("http://127.0.0.1:" + std::to_string(server.port) + "/");
    browser.type("#token", annotators[0]);
    browser.click("#save-token");
    ASSERT_TRUE(browser.wait_text("#prompt", "Capital of France?"));
    EXPECT_EQ(browser.text("#first"), "Paris");
    browser.click("#pick-first");
    ASSERT_TRUE(browser.wait_text("#count", "1"));
    ASSERT_TRUE(browser.wait_text("#prompt", "2 + 2?"));
    browser.press("b");  // the keyboard shortcut for "second is better"
    ASSERT_TRUE(browser.wait_text("#count", "2"));
  }
  stopper.stop();
  store::DurableStore store(dir.path() + "/db");
  std::vector<msg::Comparison> found;
  store.scan(store::Family::Comparison, 0, UINT64_MAX, [&](const store::Key&, std::span<const uint8_t> b) {
    found.push_back(msg::decode_comparison(b));
    return true;
  });
  ASSERT_EQ(found.size(), 2u);
  EXPECT_EQ(found[0].prompt.text, "Capital of France?");
  EXPECT_EQ(found[0].choice, msg::Choice::FirstChosen);
  EXPECT_EQ(found[1].prompt.text, "2 + 2?");
  EXPECT_EQ(found[1].choice, msg::Choice::SecondChosen);
  EXPECT_EQ(found[1].annotator, "ann0");
}

}  // namespace
}  // namespace moerl::feedback
