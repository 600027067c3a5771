#include "runtime/util/files.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <string>

#include "runtime/error.hpp"

namespace moerl {
namespace fs = std::filesystem;

namespace {
[[noreturn]] void fail(const fs::path& p, const char* what) {
  throw Error(p.string() + ": " + what + ": " + std::strerror(errno));
}
}  // namespace

void sync_directory(const fs::path& dir) {
  const int fd = ::open(dir.empty() ? "." : dir.c_str(), O_RDONLY | O_DIRECTORY);
  if (fd < 0) fail(dir, "cannot open folder to sync");
  ::fsync(fd);
  ::close(fd);
}

void write_file_durably(const fs::path& file, std::string_view content) {
  // Unique per process and call: two writers of the same file (the processes of one multi-process run write
  // the same tokenizer) never share a temporary, and the last rename wins whole.
  static std::atomic<uint64_t> counter{0};
  const fs::path tmp = file.string() + ".tmp." + std::to_string(::getpid()) + "." + std::to_string(counter++);
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd < 0) fail(tmp, "cannot create");
  for (size_t done = 0; done < content.size();) {
    const ssize_t n = ::write(fd, content.data() + done, content.size() - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      ::close(fd);
      fail(tmp, "write failed");
    }
    done += static_cast<size_t>(n);
  }
  if (::fsync(fd) != 0) { ::close(fd); fail(tmp, "fsync failed"); }
  ::close(fd);
  if (::rename(tmp.c_str(), file.c_str()) != 0) fail(file, "rename failed");
  sync_directory(file.parent_path());
}

void replace_directory(const fs::path& from, const fs::path& to) {
  const fs::path old = to.string() + ".old";
  fs::remove_all(old);
  if (fs::exists(to)) fs::rename(to, old);
  fs::rename(from, to);
  sync_directory(to.parent_path());
  fs::remove_all(old);
}

}  // namespace moerl
