// The stored form of head indexes: compact little-endian binary blobs.
//
// Head blob (all integers little-endian):
//   magic "SQKVHIDX" (8 bytes) | u32 version | u32 flags (0) | u64 body_bytes |
//   body | u64 checksum
// body: i32 head_dim | i32 tokens | i32 page_tokens | i32 reserved (0) |
//   seven arrays, each u64 element count then the elements (f32 as IEEE bits, i32):
//   centroids, cluster_size, cluster_page_begin, positions, l1_centroids, l1_size, l1_child_begin.
// checksum: XXH3-64 (seed 0) of every byte before it.
//
// Layer blob (every kv head of one layer):
//   magic "SQKVLIDX" | u32 version | u32 num_heads | u64 body_bytes |
//   body: num_heads × (u64 head_blob_bytes | head blob) | u64 checksum (as above).
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"
#include "index/head_index.h"

namespace sqkv {

// Format version written by the encoders; the decoders accept exactly this version.
inline constexpr uint32_t kIndexFormatVersion = 1;

std::string EncodeHeadIndex(const HeadIndex& index);

// Never trusts `bytes`: every length is bounded by the bytes that remain, so garbage cannot make
// it crash or allocate more than about bytes.size(). Corruption on a bad magic, version,
// length, checksum or a decoded index that fails ValidateHeadIndex; *out is untouched then.
Status DecodeHeadIndex(std::string_view bytes, HeadIndex* out);

// heads: (kv_heads) indexes of one layer, kv head order.
std::string EncodeLayerIndex(const std::vector<HeadIndex>& heads);

// As DecodeHeadIndex, for a layer blob; *heads gets the kv heads in order.
Status DecodeLayerIndex(std::string_view bytes, std::vector<HeadIndex>* heads);

}  // namespace sqkv
