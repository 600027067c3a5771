// The Gloo context behind connect_gloo, for the other users of the same rendezvous (channel_gloo.cpp).
// Internal to runtime/parallel: callers outside use Collectives or Channel.
#pragma once
#include <memory>

#include "runtime/parallel/collectives.hpp"

namespace gloo::rendezvous {
class Context;
}

namespace moerl {

// Rank `rank` of a full mesh of `size` over TCP (its own device, listening on options.hostname), its keys
// under options.prefix in the rendezvous' store. Blocks until every rank joined or options.timeout passed
// (then throws moerl::Error naming the prefix and rank).
std::shared_ptr<gloo::rendezvous::Context> connect_gloo_context(const GlooRendezvous& rendezvous, int rank,
                                                                int size, const GlooOptions& options);

}  // namespace moerl
