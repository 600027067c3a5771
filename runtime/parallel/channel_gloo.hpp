// A data-plane channel (data_plane.hpp) between processes: Gloo point-to-point over TCP, with the local
// channel's semantics — one-way, in order, sends never wait for the receiver, recv checks the size and the
// timeout and names the channel, close wakes the waiters.
//
// Each end is made in the process (or thread) that uses it: the sending party connects ChannelEnd::kSender,
// the receiving one ChannelEnd::kReceiver, with the same name through the same rendezvous (a folder between
// processes, in memory between threads). Each channel is its own two-rank Gloo context (sender rank 0,
// receiver rank 1), so its messages never meet another channel's or a collective's.
//
// On the wire a message is an 8-byte header (its size in bytes) and then its bytes; a background thread on
// each end moves them: the sender's posts the queued messages in order and waits for their completion (the
// caller's send only queues a copy), the receiver's receives every message as it arrives into a queue that
// recv reads, so a wrong-sized recv finds the message whole and the stream stays in step. close on the sending
// end sends a close notice after the queued messages (the receiver's recv fails with its reason once they are
// read); close on the receiving end wakes its waiters and drops the messages that arrive later (it keeps
// taking them, so the sender's deliveries complete). A lost peer (its process died) closes the receiving end
// with the transport's error.
#pragma once
#include <memory>
#include <string>

#include "runtime/parallel/collectives.hpp"
#include "runtime/parallel/data_plane.hpp"

namespace moerl {

enum class ChannelEnd { kSender, kReceiver };

// Connects one end of channel `name` (its rendezvous keys under options.prefix + "." + the name with every
// character outside [A-Za-z0-9._-] replaced by '_', so distinct per group and run as the prefix is). Blocks
// until the other end joined or options.timeout passed (then throws moerl::Error naming the channel).
// options.timeout is also the channel's: how long recv waits for a message and a queued send for its delivery.
// The end that does not match `end` throws on use (send on a receiving end, recv on a sending end).
std::shared_ptr<Channel> connect_gloo_channel(const GlooRendezvous& rendezvous, std::string name, ChannelEnd end,
                                              const GlooOptions& options);

}  // namespace moerl
