// A report on stderr when the process dies of a fatal signal — a crash (SIGSEGV, SIGBUS, SIGILL, SIGFPE) or an
// abort (SIGABRT: a failed assertion, or glibc finding the heap corrupt, "double free or corruption") — naming the
// signal and listing the stack of the thread that took it (backtrace_symbols_fd: each frame's module and offset,
// and its function where the executable exports it, as moerl does), so that a crash seen once, in CI or in a child
// process whose log a test prints, can be traced. The signal is then raised again with its default action: the
// exit status and any core dump stay those of the unhandled signal.
#pragma once

namespace moerl {

// Installs the handlers, once per process (later calls change nothing). `program` (a string that outlives the
// process's threads, e.g. a literal) names the process in the report. The calling thread's handler runs on a stack
// of its own, so that a stack overflow there is reported too.
void install_crash_report(const char* program);

}  // namespace moerl
