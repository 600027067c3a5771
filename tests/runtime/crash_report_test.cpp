// runtime/util/crash_report: a process that installed it and then dies of a fatal signal reports the signal and
// its stack on stderr, and still dies of that signal (exit status and core dump unchanged). The dying process is
// this test binary again (exec), running the helper test below with the signal to raise in its environment.
#include <gtest/gtest.h>

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <optional>
#include <string>
#include <vector>

#include "runtime/util/crash_report.hpp"
#include "tests/support/reap.hpp"
#include "tests/support/scratch_dir.hpp"

extern char** environ;

namespace moerl {
namespace {

namespace fs = std::filesystem;
constexpr char kSignalVariable[] = "MOERL_CRASH_REPORT_SIGNAL";  // set for the helper process only
constexpr char kHelper[] = "CrashReport.HelperDiesOfItsSignalWhenStartedByTheReportTests";

// Runs the helper with `how` ("segv" or "abort") in its environment, its output into `log`; the waitpid status.
int run_helper(const std::string& how, const fs::path& log) {
  std::string self = fs::read_symlink("/proc/self/exe").string(), filter = std::string("--gtest_filter=") + kHelper;
  std::string variable = std::string(kSignalVariable) + "=" + how;
  std::vector<char*> argv = {self.data(), filter.data(), nullptr}, envp;
  for (char** e = environ; *e != nullptr; ++e) envp.push_back(*e);
  envp.push_back(variable.data());
  envp.push_back(nullptr);
  const std::string log_file = log.string();
  const pid_t child = fork();
  if (child == 0) {  // async-signal-safe calls only until exec
    const int fd = ::open(log_file.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd >= 0) dup2(fd, 1), dup2(fd, 2);
    execve(argv[0], argv.data(), envp.data());
    _exit(127);
  }
  const std::optional<int> status = test::reap_by(child, std::chrono::steady_clock::now() + std::chrono::seconds(60));
  return status.value_or(-1);
}

std::string text_of(const fs::path& file) {
  std::ifstream in(file);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

void expect_report(const std::string& how, int sig, const std::string& name) {
  const test::ScratchDir dir("crash-report-" + how);
  const int status = run_helper(how, dir.path / "stderr.txt");
  const std::string err = text_of(dir.path / "stderr.txt");
  ASSERT_TRUE(WIFSIGNALED(status)) << how << ": status " << status << "\n" << err;
  EXPECT_EQ(WTERMSIG(status), sig) << "the process still dies of its signal\n" << err;
  EXPECT_NE(err.find("crash-report-helper: fatal signal " + std::to_string(sig) + " (" + name), std::string::npos)
      << err;
  // The stack: one line a frame, the helper's own among them.
  const size_t stack = err.find("the stack of the thread that took it:\n");
  ASSERT_NE(stack, std::string::npos) << err;
  EXPECT_GE(std::count(err.begin() + static_cast<std::ptrdiff_t>(stack), err.end(), '\n'), 4) << err;
  EXPECT_NE(err.find("moerl_tests"), std::string::npos) << "frames name their module\n" << err;
}

TEST(CrashReport, AnInvalidAccessReportsSigsegvAndItsStackThenEndsTheProcessBySigsegv) {
  expect_report("segv", SIGSEGV, "SIGSEGV");
}

TEST(CrashReport, AnAbortReportsSigabrtAndItsStackThenEndsTheProcessBySigabrt) {
  expect_report("abort", SIGABRT, "SIGABRT");
}

TEST(CrashReport, HelperDiesOfItsSignalWhenStartedByTheReportTests) {
  const char* how = std::getenv(kSignalVariable);
  if (how == nullptr) GTEST_SKIP() << "the process the CrashReport tests start and watch die";
  install_crash_report("crash-report-helper");
  install_crash_report("installed twice: changes nothing");
  if (std::string(how) == "abort") std::abort();
  raise(SIGSEGV);
  FAIL() << "still running after the signal";
}

}  // namespace
}  // namespace moerl
