#include "actors/cluster/auth.hpp"

#include <sys/stat.h>

#include <cstdio>
#include <fstream>
#include <sstream>

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>

#include "runtime/error.hpp"

namespace moerl::cluster {
namespace fs = std::filesystem;

std::string read_secret_file(const fs::path& file) {
  const std::string name = file.string();
  struct stat st {};
  require(::stat(name.c_str(), &st) == 0, name + ": cluster secret file not found");
  require(S_ISREG(st.st_mode), name + ": cluster secret is not a regular file");
  char mode[8];
  std::snprintf(mode, sizeof mode, "%03o", static_cast<unsigned>(st.st_mode & 0777));
  require((st.st_mode & (S_IRGRP | S_IROTH)) == 0,
          name + ": cluster secret is readable by other users (mode " + mode + "); run chmod 600 " + name);
  std::ifstream in(file, std::ios::binary);
  require(in.good(), name + ": cannot read the cluster secret");
  std::stringstream s;
  s << in.rdbuf();
  std::string secret = s.str();
  while (!secret.empty() && (secret.back() == '\n' || secret.back() == '\r' || secret.back() == ' ' ||
                             secret.back() == '\t'))
    secret.pop_back();
  require(secret.size() >= kMinSecretBytes, name + ": the cluster secret has " + std::to_string(secret.size()) +
                                                " bytes, expected at least " + std::to_string(kMinSecretBytes));
  return secret;
}

std::string create_secret_file(const fs::path& file) {
  static const char* hex = "0123456789abcdef";
  std::string secret;
  for (uint8_t b : random_bytes(32)) {
    secret += hex[b >> 4];
    secret += hex[b & 15];
  }
  if (file.has_parent_path()) fs::create_directories(file.parent_path());
  const std::string name = file.string();
  {
    std::ofstream out(file, std::ios::binary | std::ios::trunc);
    require(out.good(), name + ": cannot write the cluster secret");
    // The file may not be readable by others even for an instant longer than needed: chmod before writing.
    fs::permissions(file, fs::perms::owner_read | fs::perms::owner_write, fs::perm_options::replace);
    out << secret << "\n";
    require(out.good(), name + ": cannot write the cluster secret");
  }
  return secret;
}

Bytes random_bytes(size_t n) {
  Bytes out(n);
  require(RAND_bytes(out.data(), static_cast<int>(n)) == 1, "OpenSSL RAND_bytes failed: no entropy for nonces");
  return out;
}

Bytes hmac_sha256(std::string_view key, std::span<const uint8_t> message) {
  Bytes out(EVP_MAX_MD_SIZE);
  unsigned int len = 0;
  const unsigned char* ok = HMAC(EVP_sha256(), key.data(), static_cast<int>(key.size()), message.data(),
                                 message.size(), out.data(), &len);
  require(ok != nullptr && len == 32, "OpenSSL HMAC-SHA-256 failed");
  out.resize(len);
  return out;
}

Bytes handshake_proof(std::string_view secret, std::string_view label, std::string_view name,
                      std::span<const uint8_t> first_nonce, std::span<const uint8_t> second_nonce) {
  Bytes message;
  message.insert(message.end(), label.begin(), label.end());
  message.push_back(0);
  message.insert(message.end(), name.begin(), name.end());
  message.push_back(0);
  message.insert(message.end(), first_nonce.begin(), first_nonce.end());
  message.insert(message.end(), second_nonce.begin(), second_nonce.end());
  return hmac_sha256(secret, message);
}

bool equal_in_constant_time(std::span<const uint8_t> a, std::span<const uint8_t> b) {
  return a.size() == b.size() && CRYPTO_memcmp(a.data(), b.data(), a.size()) == 0;
}

}  // namespace moerl::cluster
