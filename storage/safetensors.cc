#include "storage/safetensors.h"

#include "storage/file_util.h"

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <utility>

namespace sqkv {
namespace {

using Json = nlohmann::json;

static_assert(std::endian::native == std::endian::little,
              "safetensors bytes are little-endian; a big-endian host would need byte swaps");

constexpr size_t kHeaderLengthBytes = 8;            // the u64 before the JSON header
// Real headers are kilobytes; a file at the import's 65,535-layer limit with k, v and q tensors
// has one of about 20 MB. The parsed header takes up to about 30 times its size in memory (a map
// node and strings per key), so the limit bounds what a hostile file can make the reader hold.
constexpr uint64_t kMaxHeaderBytes = 32ull << 20;
constexpr size_t kMaxNameBytes = 1024;  // of a tensor name
constexpr size_t kMaxRank = 64;         // dims of a shape (numpy's own limit)
constexpr size_t kMaxKeysListed = 6;    // of an entry, in an error
constexpr size_t kHeaderAlignment = 8;              // the writer pads the header to this
// The format nests 3 deep (header > tensor entry > shape); deeper (within reason) is left to the
// per-field checks so their errors name the tensor.
constexpr size_t kMaxJsonDepth = 16;
constexpr size_t kMaxQuotedChars = 48;  // of a JSON value echoed in an error
constexpr const char* kMetadataKey = "__metadata__";
// ReadFloat converts F16/BF16 through a buffer of this many bytes at most.
constexpr size_t kStagingBytes = 1 << 20;

const char* FormatDTypeName(DType t) {
  switch (t) {
    case DType::kF32:
      return "F32";
    case DType::kF16:
      return "F16";
    case DType::kBF16:
      return "BF16";
  }
  return "?";
}

// Only the exact safetensors spellings; ParseDType's friendlier aliases are not part of the format.
std::optional<DType> ParseFormatDType(std::string_view s) {
  for (DType t : {DType::kF32, DType::kF16, DType::kBF16}) {
    if (s == FormatDTypeName(t)) return t;
  }
  return std::nullopt;
}

std::string ShapeString(const std::vector<int64_t>& shape) {
  std::string s = "(";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i > 0) s += ", ";
    s += std::to_string(shape[i]);
  }
  return s + ")";
}

std::string RangeString(uint64_t begin, uint64_t end) {
  // Appended piecewise: GCC 12 warns falsely (-Wrestrict) on "[" + std::to_string(...).
  std::string s = "[";
  s += std::to_string(begin);
  s += ", ";
  s += std::to_string(end);
  s += ")";
  return s;
}

// A JSON value as text for an error message, cut short if long.
std::string Quote(const Json& v) {
  std::string s = v.dump(-1, ' ', false, Json::error_handler_t::replace);
  if (s.size() > kMaxQuotedChars) s = s.substr(0, kMaxQuotedChars) + "...";
  return s;
}

// Bytes of a tensor of `shape` and `dtype`; nullopt if a dim is negative or the product overflows.
std::optional<uint64_t> ShapeBytes(DType dtype, const std::vector<int64_t>& shape) {
  uint64_t n = DTypeSize(dtype);
  for (int64_t d : shape) {
    if (d < 0 || __builtin_mul_overflow(n, static_cast<uint64_t>(d), &n)) return std::nullopt;
  }
  return n;
}

// "an object", "a number": a JSON type for a message.
std::string TypeWithArticle(const Json& v) {
  const std::string t = v.type_name();
  return (std::string_view("aeiou").find(t[0]) != std::string_view::npos ? "an " : "a ") + t;
}

Status TensorError(const std::string& name, const std::string& what) {
  return Status::InvalidArgument("tensor " + name + ": " + what);
}

// Fails on a NUL byte (nlohmann would stop there as if the input ended, hiding what follows) or on
// nesting deeper than kMaxJsonDepth (so a header of a million '[' costs no memory to refuse).
// Runs before the real parse; everything else about the syntax is left to nlohmann.
Status PrescanHeader(std::string_view text) {
  size_t depth = 0;
  bool in_string = false;
  for (size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (c == '\0') {
      return Status::InvalidArgument("header is not valid JSON: NUL byte at offset " +
                                     std::to_string(i));
    }
    if (in_string) {
      if (c == '\\') {
        ++i;  // skip the escaped character
      } else if (c == '"') {
        in_string = false;
      }
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      if (++depth > kMaxJsonDepth) {
        return Status::InvalidArgument("header nests deeper than " + std::to_string(kMaxJsonDepth) +
                                       " levels");
      }
    } else if ((c == ']' || c == '}') && depth > 0) {
      --depth;
    }
  }
  return Status::Ok();
}

// Builds the header's DOM from nlohmann's SAX events, refusing a key that repeats in its object
// (nlohmann's DOM parser would keep the last silently). Linear in the header: nlohmann's parser
// with a callback searches the parent object at every object's end, which made a header of 131K
// tensors (65,536 layers) take minutes to refuse.
class HeaderBuilder final : public nlohmann::json_sax<Json> {
 public:
  explicit HeaderBuilder(Json* root) : root_(root) {}
  const std::string& problem() const { return problem_; }

  bool null() override { return Put(nullptr) != nullptr; }
  bool boolean(bool v) override { return Put(v) != nullptr; }
  bool number_integer(number_integer_t v) override { return Put(v) != nullptr; }
  bool number_unsigned(number_unsigned_t v) override { return Put(v) != nullptr; }
  bool number_float(number_float_t v, const string_t&) override { return Put(v) != nullptr; }
  bool string(string_t& v) override { return Put(std::move(v)) != nullptr; }
  bool binary(binary_t& v) override { return Put(Json::binary(std::move(v))) != nullptr; }
  bool start_object(std::size_t) override { return Open(Json::object()); }
  bool start_array(std::size_t) override { return Open(Json::array()); }
  bool end_object() override { return Close(); }
  bool end_array() override { return Close(); }
  bool key(string_t& k) override {
    std::set<std::string>& keys = open_.back().keys;
    if (open_.size() == 1) top_key_ = k;
    if (!keys.insert(k).second) {
      if (open_.size() == 1) {
        problem_ = "tensor " + k + " appears twice in the header";
      } else if (top_key_ == kMetadataKey) {
        problem_ = std::string(kMetadataKey) + " repeats the key " + Quote(Json(k));
      } else {
        problem_ = "tensor " + top_key_ + ": entry repeats the key " + Quote(Json(k));
      }
      return false;
    }
    key_ = std::move(k);
    return true;
  }
  bool parse_error(std::size_t, const std::string&, const nlohmann::detail::exception& e) override {
    problem_ = std::string("header is not valid JSON: ") + e.what();
    return false;
  }

 private:
  struct Level {  // an object or array being filled
    Json* value;
    std::set<std::string> keys;  // an object's keys so far
  };
  // Places v where the next value goes (the root, the pending key of the innermost object, or the
  // end of the innermost array) and returns where it now lives. Pointers into an array stay valid
  // while they are open: nothing is appended to an array until its open element has closed.
  Json* Put(Json v) {
    if (open_.empty()) {
      *root_ = std::move(v);
      return root_;
    }
    Json& parent = *open_.back().value;
    if (parent.is_object()) return &(parent[key_] = std::move(v));
    parent.push_back(std::move(v));
    return &parent.back();
  }
  bool Open(Json v) {
    open_.push_back(Level{Put(std::move(v)), {}});
    return true;
  }
  bool Close() {
    open_.pop_back();
    return true;
  }

  Json* root_;
  std::vector<Level> open_;
  std::string key_, top_key_, problem_;
};

// Parses the header text. Beyond nlohmann's own checks (syntax, UTF-8, trailing garbage) this
// rejects duplicate keys in any object (HeaderBuilder).
Status ParseHeaderJson(std::string_view text, Json* out) {
  SQKV_RETURN_IF_ERROR(PrescanHeader(text));
  HeaderBuilder builder(out);
  bool ok = false;
  try {
    ok = Json::sax_parse(text.begin(), text.end(), &builder);
  } catch (const Json::exception& e) {
    return Status::InvalidArgument(std::string("header is not valid JSON: ") + e.what());
  }
  const std::string& problem = builder.problem();
  if (!ok && problem.empty()) return Status::InvalidArgument("header is not valid JSON");
  if (!problem.empty()) return Status::InvalidArgument(problem);
  if (!out->is_object()) {
    return Status::InvalidArgument("header is " + TypeWithArticle(*out) + ", not an object");
  }
  return Status::Ok();
}

Status ParseMetadata(const Json& v, std::map<std::string, std::string>* out) {
  if (!v.is_object()) {
    return Status::InvalidArgument(std::string(kMetadataKey) + " is " + TypeWithArticle(v) +
                                   ", not an object of strings");
  }
  for (const auto& [key, value] : v.items()) {
    if (!value.is_string()) {
      return Status::InvalidArgument(std::string(kMetadataKey) + " entry " + Quote(key) + " is " +
                                     TypeWithArticle(value) + ", not a string");
    }
    (*out)[key] = value.get<std::string>();
  }
  return Status::Ok();
}

Status ParseShape(const std::string& name, const Json& v, std::vector<int64_t>* shape) {
  if (!v.is_array()) return TensorError(name, "shape " + Quote(v) + " is not an array");
  if (v.size() > kMaxRank) {
    return TensorError(name, "shape has " + std::to_string(v.size()) + " dims, more than " +
                                 std::to_string(kMaxRank));
  }
  for (size_t i = 0; i < v.size(); ++i) {
    const Json& d = v[i];
    // Non-negative integers parse as unsigned; negatives as signed; 2.0 and 2.5 as floats.
    if (!d.is_number_unsigned() || d.get<uint64_t>() > static_cast<uint64_t>(INT64_MAX)) {
      return TensorError(name, "shape dim " + std::to_string(i) + " is " + Quote(d) +
                                   ", not a non-negative integer");
    }
    shape->push_back(static_cast<int64_t>(d.get<uint64_t>()));
  }
  return Status::Ok();
}

Status ParseOffsets(const std::string& name, const Json& v, uint64_t* begin, uint64_t* end) {
  if (!v.is_array() || v.size() != 2 || !v[0].is_number_unsigned() || !v[1].is_number_unsigned()) {
    return TensorError(name, "data_offsets " + Quote(v) + " are not 2 non-negative integers");
  }
  *begin = v[0].get<uint64_t>();
  *end = v[1].get<uint64_t>();
  if (*end < *begin) {
    return TensorError(name, "data_offsets " + Quote(v) + " decrease");
  }
  return Status::Ok();
}

// One tensor entry, checked against itself and against a data section of `data_size` bytes.
Status ParseTensor(const std::string& name, const Json& entry, uint64_t data_size,
                   TensorInfo* info) {
  info->name = name;
  if (name.empty()) return Status::InvalidArgument("a tensor has an empty name");
  if (name.size() > kMaxNameBytes) {
    return Status::InvalidArgument("tensor name " + Quote(Json(name)) + " has " +
                                   std::to_string(name.size()) + " bytes, more than " +
                                   std::to_string(kMaxNameBytes));
  }
  if (!entry.is_object()) {
    return TensorError(name, "entry is " + TypeWithArticle(entry) + ", not an object");
  }
  if (entry.size() != 3 || !entry.contains("dtype") || !entry.contains("shape") ||
      !entry.contains("data_offsets")) {
    std::string keys;
    size_t listed = 0;
    for (const auto& [key, value] : entry.items()) {
      if (listed++ == kMaxKeysListed) {
        keys += ", ... (" + std::to_string(entry.size()) + " keys)";
        break;
      }
      keys += (keys.empty() ? "" : ", ") + Quote(Json(key));
    }
    return TensorError(
        name, "entry must have exactly the keys dtype, shape, data_offsets; has {" + keys + "}");
  }
  const Json& dtype = entry["dtype"];
  if (!dtype.is_string()) return TensorError(name, "dtype " + Quote(dtype) + " is not a string");
  std::optional<DType> parsed = ParseFormatDType(dtype.get<std::string>());
  if (!parsed) {
    return TensorError(
        name, "dtype " + dtype.get<std::string>() + " is not supported (only F32, F16 and BF16)");
  }
  info->dtype = *parsed;
  SQKV_RETURN_IF_ERROR(ParseShape(name, entry["shape"], &info->shape));
  SQKV_RETURN_IF_ERROR(
      ParseOffsets(name, entry["data_offsets"], &info->data_begin, &info->data_end));

  const std::string range = RangeString(info->data_begin, info->data_end);
  std::optional<uint64_t> need = ShapeBytes(info->dtype, info->shape);
  if (!need || *need > SIZE_MAX) {
    return TensorError(name, "shape " + ShapeString(info->shape) + " has too many elements");
  }
  const uint64_t held = info->data_end - info->data_begin;
  if (held != *need) {
    return TensorError(name, "data_offsets " + range + " hold " + std::to_string(held) +
                                 " bytes but shape " + ShapeString(info->shape) + " of " +
                                 FormatDTypeName(info->dtype) + " needs " + std::to_string(*need));
  }
  if (info->data_end > data_size) {
    return TensorError(name, "data_offsets " + range + " end past the data section of " +
                                 std::to_string(data_size) + " bytes (truncated file?)");
  }
  return Status::Ok();
}

// Fails if any two tensors share a byte. Empty tensors occupy no bytes and never overlap.
Status CheckNoOverlap(const std::vector<TensorInfo>& tensors) {
  std::vector<const TensorInfo*> by_begin;
  for (const TensorInfo& t : tensors) {
    if (t.data_end > t.data_begin) by_begin.push_back(&t);
  }
  std::sort(by_begin.begin(), by_begin.end(),
            [](const TensorInfo* a, const TensorInfo* b) { return a->data_begin < b->data_begin; });
  // Sorted by begin, non-empty ranges are disjoint iff each begins at or after the previous end.
  for (size_t i = 1; i < by_begin.size(); ++i) {
    const TensorInfo& prev = *by_begin[i - 1];
    const TensorInfo& cur = *by_begin[i];
    if (cur.data_begin < prev.data_end) {
      return TensorError(cur.name, "data_offsets " + RangeString(cur.data_begin, cur.data_end) +
                                       " overlap tensor " + prev.name + " at " +
                                       RangeString(prev.data_begin, prev.data_end));
    }
  }
  return Status::Ok();
}



// The end of an error for a read that found the file shorter than it was when opened.
std::string ShrunkNote(int fd, uint64_t bytes_when_opened) {
  struct stat st {};
  const std::string now =
      ::fstat(fd, &st) == 0 ? "now has " + std::to_string(st.st_size) + " bytes" : "ended early";
  return "the file " + now + ", " + std::to_string(bytes_when_opened) +
         " when opened (was it truncated while being read?)";
}

}  // namespace

size_t TensorInfo::num_elements() const {
  size_t n = 1;
  for (int64_t d : shape) n *= static_cast<size_t>(d);
  return n;
}

size_t TensorInfo::nbytes() const { return num_elements() * DTypeSize(dtype); }

Result<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(const std::string& path) {
  int fd = -1;
  uint64_t size = 0;
  SQKV_RETURN_IF_ERROR(OpenRegularFile(path, &fd, &size));
  std::unique_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->fd_ = fd;  // closed by the destructor from here on
  file->path_ = path;
  file->file_bytes_ = size;
  if (size < kHeaderLengthBytes) {
    return Status::InvalidArgument(path + ": file is " + std::to_string(size) +
                                   " bytes, shorter than the 8-byte header length");
  }
  // The size is known from Open's fstat; an early end while reading the header means the file
  // shrank since then.
  auto read_header = [&](uint64_t offset, size_t n, void* dst) {
    size_t got = 0;
    SQKV_RETURN_IF_ERROR(PreadFull(fd, offset, n, dst, path, &got));
    if (got == n) return Status::Ok();
    return Status::IOError(path + ": reading the header: " + ShrunkNote(fd, size));
  };
  uint64_t header_len;
  // Little-endian host (asserted above).
  SQKV_RETURN_IF_ERROR(read_header(0, sizeof(header_len), &header_len));
  if (header_len > kMaxHeaderBytes) {
    return Status::InvalidArgument(path + ": header length " + std::to_string(header_len) +
                                   " exceeds the limit of " + std::to_string(kMaxHeaderBytes) +
                                   " bytes");
  }
  if (header_len > size - kHeaderLengthBytes) {
    return Status::InvalidArgument(path + ": header length " + std::to_string(header_len) +
                                   " runs past the end of the file (" + std::to_string(size) +
                                   " bytes)");
  }
  const uint64_t data_size = size - kHeaderLengthBytes - header_len;
  file->data_section_ = kHeaderLengthBytes + header_len;

  std::string text(header_len, '\0');
  SQKV_RETURN_IF_ERROR(read_header(kHeaderLengthBytes, text.size(), text.data()));
  Json header;
  SQKV_RETURN_IF_ERROR(ParseHeaderJson(text, &header).WithContext(path));
  for (const auto& [key, value] : header.items()) {
    if (key == kMetadataKey) {
      SQKV_RETURN_IF_ERROR(ParseMetadata(value, &file->metadata_).WithContext(path));
      continue;
    }
    TensorInfo info;
    SQKV_RETURN_IF_ERROR(ParseTensor(key, value, data_size, &info).WithContext(path));
    file->tensors_.push_back(std::move(info));
  }
  std::sort(file->tensors_.begin(), file->tensors_.end(),
            [](const TensorInfo& a, const TensorInfo& b) { return a.name < b.name; });
  SQKV_RETURN_IF_ERROR(CheckNoOverlap(file->tensors_).WithContext(path));
  return file;
}

SafetensorsFile::~SafetensorsFile() {
  if (fd_ >= 0) close(fd_);
}

const TensorInfo* SafetensorsFile::Find(std::string_view name) const {
  auto it = std::lower_bound(tensors_.begin(), tensors_.end(), name,
                             [](const TensorInfo& t, std::string_view n) { return t.name < n; });
  return it != tensors_.end() && it->name == name ? &*it : nullptr;
}

Status SafetensorsFile::ReadRange(const TensorInfo& info, uint64_t offset, size_t nbytes,
                                  void* dst) const {
  const uint64_t at = data_section_ + info.data_begin + offset;  // in the file
  size_t got = 0;
  Status s = PreadFull(fd_, at, nbytes, dst, path_, &got);
  if (s.ok() && got == nbytes) return s;
  const std::string what = path_ + ": tensor " + info.name + ": reading " + std::to_string(nbytes) +
                           " bytes at file offset " + std::to_string(at);
  if (!s.ok()) return s.WithContext(what);
  return Status::IOError(what + ": " + ShrunkNote(fd_, file_bytes_));
}

Status SafetensorsFile::Read(const TensorInfo& info, void* dst) const {
  return ReadRange(info, 0, info.nbytes(), dst);
}

Status SafetensorsFile::ReadFloat(const TensorInfo& info, float* dst) const {
  const size_t n = info.num_elements();
  if (info.dtype == DType::kF32) return Read(info, dst);  // the bytes are the floats
  const size_t elem = DTypeSize(info.dtype);
  const size_t chunk = kStagingBytes / elem;  // elements per read
  std::vector<uint8_t> staging(std::min(n, chunk) * elem);
  for (size_t done = 0; done < n; done += chunk) {
    const size_t m = std::min(chunk, n - done);
    SQKV_RETURN_IF_ERROR(ReadRange(info, done * elem, m * elem, staging.data()));
    ToFloat(info.dtype, staging.data(), dst + done, m);
  }
  return Status::Ok();
}

void SafetensorsWriter::Add(std::string name, DType dtype, std::vector<int64_t> shape,
                            const void* data) {
  // A shape with negative dims has no size; queue no bytes and let Write name the problem.
  const uint64_t nbytes = ShapeBytes(dtype, shape).value_or(0);
  Add(std::move(name), dtype, std::move(shape), data, nbytes > SIZE_MAX ? 0 : nbytes);
}

void SafetensorsWriter::Add(std::string name, DType dtype, std::vector<int64_t> shape,
                            const void* data, size_t nbytes) {
  Pending p{std::move(name), dtype, std::move(shape), {}, nbytes};
  if (data != nullptr) {
    const auto* b = static_cast<const uint8_t*>(data);
    p.bytes.assign(b, b + nbytes);
  }
  pending_.push_back(std::move(p));
}

void SafetensorsWriter::SetMetadata(std::map<std::string, std::string> metadata) {
  metadata_ = std::move(metadata);
}

Status SafetensorsWriter::Write(const std::string& path) const {
  Json header = Json::object();
  std::set<std::string_view> names;
  uint64_t offset = 0;
  for (const Pending& p : pending_) {
    if (p.name.empty()) return Status::InvalidArgument(path + ": a tensor has an empty name");
    if (p.name == kMetadataKey) {
      return Status::InvalidArgument(path + ": tensor name " + p.name + " is reserved");
    }
    if (!names.insert(p.name).second) {
      return Status::InvalidArgument(path + ": tensor " + p.name + " is added twice");
    }
    std::optional<uint64_t> need = ShapeBytes(p.dtype, p.shape);
    if (!need) {
      return Status::InvalidArgument(path + ": tensor " + p.name + ": shape " +
                                     ShapeString(p.shape) +
                                     " has a negative dim or too many elements");
    }
    if (p.declared_nbytes != *need || p.bytes.size() != *need) {
      return Status::InvalidArgument(path + ": tensor " + p.name + ": " +
                                     std::to_string(p.declared_nbytes) + " bytes of " +
                                     (p.bytes.size() == p.declared_nbytes ? "data" : "null data") +
                                     " but shape " + ShapeString(p.shape) + " of " +
                                     FormatDTypeName(p.dtype) + " needs " + std::to_string(*need));
    }
    header[p.name] = {{"dtype", FormatDTypeName(p.dtype)},
                      {"shape", p.shape},
                      {"data_offsets", {offset, offset + *need}}};
    offset += *need;
  }
  if (!metadata_.empty()) header[kMetadataKey] = metadata_;

  std::string text;
  try {
    text = header.dump();  // strict: throws on names or metadata that are not valid UTF-8
  } catch (const Json::exception& e) {
    return Status::InvalidArgument(path + ": cannot encode the header: " + e.what());
  }
  text.append((kHeaderAlignment - text.size() % kHeaderAlignment) % kHeaderAlignment, ' ');
  const uint64_t header_len = text.size();
  char len_bytes[kHeaderLengthBytes];
  std::memcpy(len_bytes, &header_len, sizeof(len_bytes));  // little-endian host

  std::vector<std::string_view> parts = {std::string_view(len_bytes, sizeof(len_bytes)), text};
  for (const Pending& p : pending_) {
    parts.emplace_back(reinterpret_cast<const char*>(p.bytes.data()), p.bytes.size());
  }
  return WriteFileAtomically(path, parts);
}

}  // namespace sqkv
