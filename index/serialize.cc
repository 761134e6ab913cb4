#include "index/serialize.h"

#include <xxhash.h>

#include <algorithm>
#include <bit>
#include <cstring>
#include <string>
#include <utility>

namespace sqkv {
namespace {

constexpr char kHeadMagic[8] = {'S', 'Q', 'K', 'V', 'H', 'I', 'D', 'X'};
constexpr char kLayerMagic[8] = {'S', 'Q', 'K', 'V', 'L', 'I', 'D', 'X'};
// magic | u32 version | u32 flags-or-count | u64 body_bytes.
constexpr size_t kHeaderBytes = 8 + 4 + 4 + 8;
constexpr size_t kChecksumBytes = 8;

uint64_t Checksum(std::string_view bytes) { return XXH3_64bits(bytes.data(), bytes.size()); }

// ---- writing ----
// Byte-by-byte stores: endian-independent, and compilers merge them into single stores.

void PutU32(std::string* s, uint32_t v) {
  char b[4];
  for (int i = 0; i < 4; ++i) b[i] = static_cast<char>((v >> (8 * i)) & 0xff);
  s->append(b, 4);
}

void PutU64(std::string* s, uint64_t v) {
  char b[8];
  for (int i = 0; i < 8; ++i) b[i] = static_cast<char>((v >> (8 * i)) & 0xff);
  s->append(b, 8);
}

// T: int32_t or float, 4 bytes each.
template <typename T>
void PutArray(std::string* s, const std::vector<T>& v) {
  static_assert(sizeof(T) == 4);
  PutU64(s, v.size());
  const size_t at = s->size();
  s->resize(at + 4 * v.size());
  char* dst = s->data() + at;
  for (size_t i = 0; i < v.size(); ++i) {
    const uint32_t u = std::bit_cast<uint32_t>(v[i]);
    for (int b = 0; b < 4; ++b) dst[4 * i + b] = static_cast<char>((u >> (8 * b)) & 0xff);
  }
}

// Wraps `body` in magic, version, `word` (flags or count), length and checksum.
std::string Frame(const char (&magic)[8], uint32_t word, const std::string& body) {
  std::string s;
  s.reserve(kHeaderBytes + body.size() + kChecksumBytes);
  s.append(magic, 8);
  PutU32(&s, kIndexFormatVersion);
  PutU32(&s, word);
  PutU64(&s, body.size());
  s += body;
  PutU64(&s, Checksum(s));
  return s;
}

// ---- reading ----

// A cursor over untrusted bytes; every read checks what remains.
class Reader {
 public:
  explicit Reader(std::string_view bytes) : bytes_(bytes) {}
  size_t remaining() const { return bytes_.size() - pos_; }

  bool U32(uint32_t* v) {
    if (remaining() < 4) return false;
    *v = 0;
    for (int i = 0; i < 4; ++i) *v |= static_cast<uint32_t>(Byte(pos_ + i)) << (8 * i);
    pos_ += 4;
    return true;
  }
  bool U64(uint64_t* v) {
    if (remaining() < 8) return false;
    *v = 0;
    for (int i = 0; i < 8; ++i) *v |= static_cast<uint64_t>(Byte(pos_ + i)) << (8 * i);
    pos_ += 8;
    return true;
  }
  bool I32(int32_t* v) {
    uint32_t u;
    if (!U32(&u)) return false;
    *v = std::bit_cast<int32_t>(u);
    return true;
  }
  bool Bytes(size_t n, std::string_view* out) {
    if (remaining() < n) return false;
    *out = bytes_.substr(pos_, n);
    pos_ += n;
    return true;
  }
  // u64 count then count 4-byte elements; the count is bounded by the bytes left.
  template <typename T>
  bool Array(std::vector<T>* v) {
    static_assert(sizeof(T) == 4);
    uint64_t n;
    if (!U64(&n) || n > remaining() / 4) return false;
    v->resize(n);
    for (size_t i = 0; i < n; ++i) {
      uint32_t u = 0;
      for (int b = 0; b < 4; ++b) u |= static_cast<uint32_t>(Byte(pos_ + 4 * i + b)) << (8 * b);
      (*v)[i] = std::bit_cast<T>(u);
    }
    pos_ += 4 * n;
    return true;
  }

 private:
  uint8_t Byte(size_t at) const { return static_cast<uint8_t>(bytes_[at]); }
  std::string_view bytes_;
  size_t pos_ = 0;
};

// Checks magic, version, length and checksum of a framed blob; *word gets the header's
// flags-or-count word and *body the body bytes.
Status Unframe(std::string_view bytes, const char (&magic)[8], const char* what, uint32_t* word,
               std::string_view* body) {
  auto bad = [&](const std::string& m) { return Status::Corruption(std::string(what) + ": " + m); };
  if (bytes.size() < kHeaderBytes + kChecksumBytes) {
    return bad("truncated (" + std::to_string(bytes.size()) + " bytes)");
  }
  if (std::memcmp(bytes.data(), magic, 8) != 0) return bad("bad magic");
  Reader r(bytes.substr(8));
  uint32_t version = 0;
  uint64_t body_bytes = 0;
  if (!r.U32(&version) || !r.U32(word) || !r.U64(&body_bytes)) return bad("truncated header");
  if (version != kIndexFormatVersion) {
    return bad("format version " + std::to_string(version) + ", expected " +
               std::to_string(kIndexFormatVersion));
  }
  if (body_bytes != bytes.size() - kHeaderBytes - kChecksumBytes) {
    return bad("body length " + std::to_string(body_bytes) + " does not match blob size " +
               std::to_string(bytes.size()));
  }
  const size_t checked = bytes.size() - kChecksumBytes;
  Reader tail(bytes.substr(checked));
  uint64_t stored = 0;
  if (!tail.U64(&stored)) return bad("truncated checksum");
  if (stored != Checksum(bytes.substr(0, checked))) return bad("checksum mismatch");
  *body = bytes.substr(kHeaderBytes, body_bytes);
  return Status::Ok();
}

}  // namespace

std::string EncodeHeadIndex(const HeadIndex& index) {
  std::string body;
  body.reserve(4 *
               (4 + 7 * 2 + index.centroids.size() + index.cluster_size.size() +
                index.cluster_page_begin.size() + index.positions.size() +
                index.l1_centroids.size() + index.l1_size.size() + index.l1_child_begin.size()));
  PutU32(&body, static_cast<uint32_t>(index.head_dim));
  PutU32(&body, static_cast<uint32_t>(index.tokens));
  PutU32(&body, static_cast<uint32_t>(index.page_tokens));
  PutU32(&body, 0);  // reserved
  PutArray(&body, index.centroids);
  PutArray(&body, index.cluster_size);
  PutArray(&body, index.cluster_page_begin);
  PutArray(&body, index.positions);
  PutArray(&body, index.l1_centroids);
  PutArray(&body, index.l1_size);
  PutArray(&body, index.l1_child_begin);
  return Frame(kHeadMagic, /*flags=*/0, body);
}

Status DecodeHeadIndex(std::string_view bytes, HeadIndex* out) {
  if (out == nullptr) return Status::InvalidArgument("decode head index: out is null");
  uint32_t flags = 0;
  std::string_view body;
  SQKV_RETURN_IF_ERROR(Unframe(bytes, kHeadMagic, "head index blob", &flags, &body));
  auto bad = [](const std::string& m) { return Status::Corruption("head index blob: " + m); };
  if (flags != 0) return bad("unknown flags " + std::to_string(flags));
  Reader r(body);
  HeadIndex x;
  int32_t reserved = 0;
  if (!r.I32(&x.head_dim) || !r.I32(&x.tokens) || !r.I32(&x.page_tokens) || !r.I32(&reserved)) {
    return bad("truncated shape");
  }
  if (reserved != 0) return bad("reserved word is not zero");
  if (!r.Array(&x.centroids) || !r.Array(&x.cluster_size) || !r.Array(&x.cluster_page_begin) ||
      !r.Array(&x.positions) || !r.Array(&x.l1_centroids) || !r.Array(&x.l1_size) ||
      !r.Array(&x.l1_child_begin)) {
    return bad("truncated array");
  }
  if (r.remaining() != 0) return bad(std::to_string(r.remaining()) + " trailing bytes");
  SQKV_RETURN_IF_ERROR(ValidateHeadIndex(x));
  *out = std::move(x);
  return Status::Ok();
}

std::string EncodeLayerIndex(const std::vector<HeadIndex>& heads) {
  std::string body;
  for (const HeadIndex& h : heads) {
    const std::string blob = EncodeHeadIndex(h);
    PutU64(&body, blob.size());
    body += blob;
  }
  return Frame(kLayerMagic, static_cast<uint32_t>(heads.size()), body);
}

Status DecodeLayerIndex(std::string_view bytes, std::vector<HeadIndex>* heads) {
  if (heads == nullptr) return Status::InvalidArgument("decode layer index: heads is null");
  uint32_t num_heads = 0;
  std::string_view body;
  SQKV_RETURN_IF_ERROR(Unframe(bytes, kLayerMagic, "layer index blob", &num_heads, &body));
  Reader r(body);
  std::vector<HeadIndex> out;
  // Each head takes at least its length word and a framed blob: bounds the reservation.
  out.reserve(std::min<size_t>(num_heads, body.size() / (8 + kHeaderBytes + kChecksumBytes)));
  for (uint32_t h = 0; h < num_heads; ++h) {
    uint64_t n = 0;
    std::string_view blob;
    if (!r.U64(&n) || n > r.remaining() || !r.Bytes(n, &blob)) {
      return Status::Corruption("layer index blob: truncated at kv head " + std::to_string(h));
    }
    HeadIndex x;
    SQKV_RETURN_IF_ERROR(DecodeHeadIndex(blob, &x).WithContext("kv head " + std::to_string(h)));
    out.push_back(std::move(x));
  }
  if (r.remaining() != 0) {
    return Status::Corruption("layer index blob: " + std::to_string(r.remaining()) +
                              " trailing bytes");
  }
  *heads = std::move(out);
  return Status::Ok();
}

}  // namespace sqkv
