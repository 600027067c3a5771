// Cluster authentication: every process of a cluster holds the same secret (a file), and proves it to the
// other side without sending it. The join handshake (protocol.hpp) is a mutual challenge-response:
//
//   node -> head   hello  {name, node_nonce}
//   head -> node   challenge {session, head_nonce, head_proof = HMAC(secret, "moerl-head" | name | node_nonce | head_nonce)}
//   node -> head   join   {session, node_proof = HMAC(secret, "moerl-node" | name | head_nonce | node_nonce), resources}
//
// Nonces are 32 fresh random bytes per handshake, so a recorded proof is useless for another session; the
// node checks the head's proof first, so it never runs roles for an impostor head. HMAC-SHA-256 and the
// random bytes come from OpenSSL's libcrypto.
#pragma once
#include <cstdint>
#include <filesystem>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace moerl::cluster {

using Bytes = std::vector<uint8_t>;

inline constexpr size_t kNonceBytes = 32;
inline constexpr size_t kMinSecretBytes = 16;

// The secret of a cluster: the file's bytes without trailing whitespace (a newline from `echo` does not
// count). Throws moerl::Error naming the file when it is missing, unreadable, shorter than kMinSecretBytes,
// or readable by other users (its mode must not grant group/other read).
std::string read_secret_file(const std::filesystem::path& file);

// Writes a new random secret (32 bytes, hex) to `file` with mode 0600 and returns it.
std::string create_secret_file(const std::filesystem::path& file);

// `n` bytes from OpenSSL's CSPRNG; throws moerl::Error if it is not seeded.
Bytes random_bytes(size_t n);

// HMAC-SHA-256 of `message` under `key`: 32 bytes.
Bytes hmac_sha256(std::string_view key, std::span<const uint8_t> message);

// The proof of one side of the handshake: HMAC(secret, label 0 name 0 first second), where 0 is a zero
// byte (so "ab"+"c" and "a"+"bc" differ). `label` is "moerl-head" or "moerl-node".
Bytes handshake_proof(std::string_view secret, std::string_view label, std::string_view name,
                      std::span<const uint8_t> first_nonce, std::span<const uint8_t> second_nonce);

// Equality that takes the same time wherever the first difference is (CRYPTO_memcmp).
bool equal_in_constant_time(std::span<const uint8_t> a, std::span<const uint8_t> b);

}  // namespace moerl::cluster
