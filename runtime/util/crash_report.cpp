#include "runtime/util/crash_report.hpp"

#include <execinfo.h>
#include <signal.h>
#include <unistd.h>

#include <cstring>
#include <mutex>

namespace moerl {
namespace {

const char* g_program = "moerl";
constexpr int kSignals[] = {SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT};
constexpr int kMaxFrames = 64;
alignas(16) char g_alt_stack[64 * 1024];

// Only async-signal-safe calls below: write(2), backtrace_symbols_fd (no allocation), raise.
void say(const char* s) { (void)!::write(STDERR_FILENO, s, std::strlen(s)); }

const char* name_of(int sig) {
  switch (sig) {
    case SIGSEGV: return "SIGSEGV, an invalid memory access";
    case SIGBUS: return "SIGBUS, a misaligned or unmapped access";
    case SIGILL: return "SIGILL, an illegal instruction";
    case SIGFPE: return "SIGFPE, an arithmetic fault";
    case SIGABRT: return "SIGABRT, an abort: a failed check or a corrupt heap";
    default: return "?";
  }
}

void on_fatal_signal(int sig) {
  const char number[] = {static_cast<char>(sig >= 10 ? '0' + sig / 10 : '0' + sig),
                          static_cast<char>(sig >= 10 ? '0' + sig % 10 : '\0'), '\0'};  // signals are below 100
  say("\n");
  say(g_program);
  say(": fatal signal ");
  say(number);
  say(" (");
  say(name_of(sig));
  say("); the stack of the thread that took it:\n");
  void* frames[kMaxFrames];
  backtrace_symbols_fd(frames, backtrace(frames, kMaxFrames), STDERR_FILENO);
  // SA_RESETHAND restored the default action on entry: the signal now ends the process as it would have.
  raise(sig);
}

}  // namespace

void install_crash_report(const char* program) {
  static std::once_flag once;
  std::call_once(once, [program] {
    g_program = program;
    void* warm[1];
    backtrace(warm, 1);  // loads the unwinder now: its first use may allocate, which a handler must not
    stack_t alt{};
    alt.ss_sp = g_alt_stack;
    alt.ss_size = sizeof g_alt_stack;
    sigaltstack(&alt, nullptr);
    struct sigaction action{};
    action.sa_handler = on_fatal_signal;
    sigemptyset(&action.sa_mask);
    action.sa_flags = SA_ONSTACK | SA_RESETHAND;
    for (int sig : kSignals) sigaction(sig, &action, nullptr);
  });
}

}  // namespace moerl
