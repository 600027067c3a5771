// Durable file operations: what a crash can not half-do.
#pragma once
#include <filesystem>
#include <string_view>

namespace moerl {

// Writes `content` to a temporary file beside `file` (its own, even when other threads or processes write the
// same file), fsyncs it, renames it over `file`, fsyncs the folder.
void write_file_durably(const std::filesystem::path& file, std::string_view content);
// fsync of a folder, so a rename inside it survives a crash.
void sync_directory(const std::filesystem::path& dir);
// Moves the complete folder `from` to `to`, replacing `to`: `to` is first renamed aside, then `from` renamed
// into place and the old one removed, so at every instant either the old or the new folder is whole.
void replace_directory(const std::filesystem::path& from, const std::filesystem::path& to);

}  // namespace moerl
