// The wire format: every call and answer survives encode → decode unchanged; framing limits;
// truncated, oversized and random frames are errors, never crashes.
#include "api/net/codec.h"

#include <gtest/gtest.h>

#include <cstring>
#include <random>

#include "tests/net/net_testing.h"
#include "tests/testing/testing.h"

namespace sqkv::net {
namespace {

using sqkv::testing::FreshSeed;
using sqkv::testing::RandomNormal;

Request RoundTrip(const Request& in) {
  std::vector<uint64_t> frame;
  Status s = EncodeRequest(in, &frame);
  EXPECT_TRUE(s.ok()) << s.ToString();
  Request out;
  s = DecodeRequest(frame.data(), frame.size(), Limits(), &out);
  EXPECT_TRUE(s.ok()) << s.ToString();
  EXPECT_EQ(out.id, in.id);
  EXPECT_EQ(out.deadline_ms, in.deadline_ms);
  EXPECT_EQ(out.call.index(), in.call.index());
  return out;
}

Response RoundTrip(const Response& in) {
  std::vector<uint64_t> frame;
  Status s = EncodeResponse(in, &frame);
  EXPECT_TRUE(s.ok()) << s.ToString();
  Response out;
  s = DecodeResponse(frame.data(), frame.size(), Limits(), &out);
  EXPECT_TRUE(s.ok()) << s.ToString();
  EXPECT_EQ(out.id, in.id);
  EXPECT_EQ(out.status.code(), in.status.code());
  EXPECT_EQ(out.status.message(), in.status.message());
  EXPECT_EQ(out.body.index(), in.body.index());
  return out;
}

ContextInfo SomeContext(std::mt19937_64& rng) {
  ContextInfo c;
  c.name = "doc-" + std::to_string(rng() % 1000);
  c.version = rng();
  c.layers = 3;
  c.kv_heads = 8;
  c.tokens = 123457;
  c.head_dim = 128;
  c.page_tokens = 16;
  c.dtype = DType::kF16;
  c.centroid_fraction = 0.0625f;
  c.levels = 2;
  c.l1_fraction = 0.01f;
  c.layer_first_page = {0, rng() % 1000, 2000, 3000};
  c.segment_bytes = rng();
  c.index_bytes = rng();
  c.window_q_heads = 32;
  c.window = 64;
  c.created_unix = 1795000000;
  c.build_seconds = 12.25;
  c.source = "/tmp/uploads/ctx.safetensors";
  return c;
}

void ExpectSameContext(const ContextInfo& a, const ContextInfo& b) {
  EXPECT_EQ(a.name, b.name);
  EXPECT_EQ(a.version, b.version);
  EXPECT_EQ(a.layers, b.layers);
  EXPECT_EQ(a.kv_heads, b.kv_heads);
  EXPECT_EQ(a.tokens, b.tokens);
  EXPECT_EQ(a.head_dim, b.head_dim);
  EXPECT_EQ(a.page_tokens, b.page_tokens);
  EXPECT_EQ(a.dtype, b.dtype);
  EXPECT_EQ(a.centroid_fraction, b.centroid_fraction);
  EXPECT_EQ(a.levels, b.levels);
  EXPECT_EQ(a.l1_fraction, b.l1_fraction);
  EXPECT_EQ(a.layer_first_page, b.layer_first_page);
  EXPECT_EQ(a.segment_bytes, b.segment_bytes);
  EXPECT_EQ(a.index_bytes, b.index_bytes);
  EXPECT_EQ(a.window_q_heads, b.window_q_heads);
  EXPECT_EQ(a.window, b.window);
  EXPECT_EQ(a.created_unix, b.created_unix);
  EXPECT_EQ(a.build_seconds, b.build_seconds);
  EXPECT_EQ(a.source, b.source);
}

TEST(CodecTest, QueryCallKeepsEveryFieldAndEveryBit) {
  std::mt19937_64 rng(FreshSeed());
  QueryCall c;
  c.name = "ctx.v2";
  c.layer = 7;
  c.q_heads = 32;
  c.n = 3;
  c.head_dim = 128;
  c.q = RandomNormal(static_cast<size_t>(c.q_heads) * c.n * c.head_dim, rng);
  c.q[5] = -0.f;
  c.q[6] = 1e-40f;  // subnormal
  c.options.select.mode = SelectOptions::Mode::kThreshold;
  c.options.select.keep_fraction = 0.3f;
  c.options.select.threshold = 1.5e-4f;
  c.options.select.l1_keep_fraction = 0.7f;
  c.options.device = Device::kCpu;
  c.options.want_selection = true;
  c.options.sparsity = 0.85f;
  Request out = RoundTrip(Request{42, 1500, c});
  const auto& d = std::get<QueryCall>(out.call);
  EXPECT_EQ(d.name, c.name);
  EXPECT_EQ(d.layer, c.layer);
  EXPECT_EQ(d.q_heads, c.q_heads);
  EXPECT_EQ(d.n, c.n);
  EXPECT_EQ(d.head_dim, c.head_dim);
  ASSERT_EQ(d.q.size(), c.q.size());
  EXPECT_EQ(std::memcmp(d.q.data(), c.q.data(), c.q.size() * sizeof(float)), 0);
  EXPECT_EQ(d.options.select.mode, c.options.select.mode);
  EXPECT_EQ(d.options.select.keep_fraction, c.options.select.keep_fraction);
  EXPECT_EQ(d.options.select.threshold, c.options.select.threshold);
  EXPECT_EQ(d.options.select.l1_keep_fraction, c.options.select.l1_keep_fraction);
  EXPECT_EQ(d.options.device, c.options.device);
  EXPECT_TRUE(d.options.want_selection);
  EXPECT_EQ(d.options.sparsity, c.options.sparsity);
}

TEST(CodecTest, EveryOtherCallRoundTrips) {
  std::mt19937_64 rng(FreshSeed());
  {
    Request r = RoundTrip(Request{1, 0, HelloCall{kProtocolVersion, std::string("t\0k", 3), "x"}});
    EXPECT_EQ(std::get<HelloCall>(r.call).token, std::string("t\0k", 3));
    EXPECT_EQ(std::get<HelloCall>(r.call).client, "x");
  }
  RoundTrip(Request{2, 0, ListCall{}});
  EXPECT_EQ(std::get<InfoCall>(RoundTrip(Request{3, 0, InfoCall{"a"}}).call).name, "a");
  EXPECT_EQ(std::get<RemoveCall>(RoundTrip(Request{4, 0, RemoveCall{"b"}}).call).name, "b");
  {
    ImportBeginCall b;
    b.name = "doc";
    b.file_name = "doc.safetensors";
    b.total_bytes = uint64_t{5} << 33;
    b.options.centroid_fraction = 0.1f;
    b.options.page_tokens = 32;
    b.options.levels = 2;
    b.options.l1_fraction = 0.02f;
    b.options.kmeans_iterations = 7;
    b.options.kmeans_device = Device::kCpu;
    auto d = std::get<ImportBeginCall>(RoundTrip(Request{5, 0, b}).call);
    EXPECT_EQ(d.name, b.name);
    EXPECT_EQ(d.file_name, b.file_name);
    EXPECT_EQ(d.total_bytes, b.total_bytes);
    EXPECT_EQ(d.options.centroid_fraction, 0.1f);
    EXPECT_EQ(d.options.page_tokens, 32);
    EXPECT_EQ(d.options.levels, 2);
    EXPECT_EQ(d.options.l1_fraction, 0.02f);
    EXPECT_EQ(d.options.kmeans_iterations, 7);
    EXPECT_EQ(d.options.kmeans_device, Device::kCpu);
  }
  {
    ImportChunkCall c{9, 1 << 20, std::string(1000, '\0')};
    for (auto& ch : c.data) ch = static_cast<char>(rng());
    auto d = std::get<ImportChunkCall>(RoundTrip(Request{6, 0, c}).call);
    EXPECT_EQ(d.upload_id, 9u);
    EXPECT_EQ(d.offset, uint64_t{1} << 20);
    EXPECT_EQ(d.data, c.data);
  }
  EXPECT_EQ(std::get<ImportEndCall>(RoundTrip(Request{7, 0, ImportEndCall{9}}).call).upload_id, 9u);
  {
    RebuildCall rb{"doc", {}};
    rb.options.levels = 2;
    auto d = std::get<RebuildCall>(RoundTrip(Request{8, 0, rb}).call);
    EXPECT_EQ(d.name, "doc");
    EXPECT_EQ(d.options.levels, 2);
  }
  {
    CalibrateCall c;
    c.name = "doc";
    c.use_stored_queries = false;
    for (int l = 0; l < 2; ++l) {
      WindowQueries w;
      w.q_heads = 4;
      w.window = 3;
      w.head_dim = 8;
      w.data = RandomNormal(4 * 3 * 8, rng);
      c.queries.push_back(w);
    }
    c.sparsities = {0.5f, 0.9f};
    auto d = std::get<CalibrateCall>(RoundTrip(Request{9, 0, c}).call);
    EXPECT_FALSE(d.use_stored_queries);
    ASSERT_EQ(d.queries.size(), 2u);
    EXPECT_EQ(d.queries[1].data, c.queries[1].data);
    EXPECT_EQ(d.queries[1].window, 3);
    EXPECT_EQ(d.sparsities, c.sparsities);
  }
  {
    auto d = std::get<GetThresholdsCall>(RoundTrip(Request{10, 0, GetThresholdsCall{"d", 3}}).call);
    EXPECT_EQ(d.name, "d");
    EXPECT_EQ(d.layer, 3);
  }
  EXPECT_EQ(std::get<VerifyCall>(RoundTrip(Request{11, 0, VerifyCall{""}}).call).name, "");
  RoundTrip(Request{12, 0, CompactCall{}});
  RoundTrip(Request{13, 0, StatsCall{}});
  {
    auto d = std::get<PinCall>(RoundTrip(Request{14, 0, PinCall{"p", Tier::kDevice}}).call);
    EXPECT_EQ(d.name, "p");
    EXPECT_EQ(d.tier, Tier::kDevice);
  }
  EXPECT_EQ(std::get<UnpinCall>(RoundTrip(Request{15, 0, UnpinCall{"u"}}).call).name, "u");
  EXPECT_EQ(
      std::get<PreloadCall>(RoundTrip(Request{16, 0, PreloadCall{"w", Tier::kHost}}).call).tier,
      Tier::kHost);
  RoundTrip(Request{17, 0, ListPinsCall{}});
  RoundTrip(Request{18, 0, TierStatsCall{}});
}

TEST(CodecTest, EveryAnswerRoundTrips) {
  std::mt19937_64 rng(FreshSeed());
  {
    QueryResult q;
    q.output = RandomNormal(4 * 2 * 16, rng);
    q.lse = RandomNormal(4 * 2, rng);
    q.selected_tokens = {{1, 5, 9}, {}, {0, 2147483647}};
    q.stats.device = "cpu";
    q.stats.tokens_selected = 17;
    q.stats.pages_selected = 3;
    q.stats.centroids_scored = 99;
    q.stats.pages_from_disk = 2;
    q.stats.disk_bytes_read = 8192;
    q.stats.total_ms = 0.125;
    auto d = std::get<QueryResult>(RoundTrip(Response{1, Status::Ok(), q}).body);
    EXPECT_EQ(d.output, q.output);
    EXPECT_EQ(d.lse, q.lse);
    EXPECT_EQ(d.selected_tokens, q.selected_tokens);
    EXPECT_EQ(d.stats.device, "cpu");
    EXPECT_EQ(d.stats.tokens_selected, 17);
    EXPECT_EQ(d.stats.pages_selected, 3);
    EXPECT_EQ(d.stats.centroids_scored, 99);
    EXPECT_EQ(d.stats.pages_from_disk, 2);
    EXPECT_EQ(d.stats.disk_bytes_read, 8192);
    EXPECT_EQ(d.stats.total_ms, 0.125);
  }
  {
    std::vector<ContextInfo> all = {SomeContext(rng), SomeContext(rng)};
    auto d = std::get<std::vector<ContextInfo>>(RoundTrip(Response{2, Status::Ok(), all}).body);
    ASSERT_EQ(d.size(), 2u);
    ExpectSameContext(d[0], all[0]);
    ExpectSameContext(d[1], all[1]);
    ContextInfo one = SomeContext(rng);
    ExpectSameContext(std::get<ContextInfo>(RoundTrip(Response{3, Status::Ok(), one}).body), one);
  }
  {
    auto d = std::get<HelloReply>(
        RoundTrip(Response{4, Status::Ok(), HelloReply{kProtocolVersion, "s", 123}}).body);
    EXPECT_EQ(d.server, "s");
    EXPECT_EQ(d.max_message_bytes, 123u);
  }
  EXPECT_EQ(
      std::get<ImportBeginReply>(RoundTrip(Response{5, Status::Ok(), ImportBeginReply{7, 99}}).body)
          .chunk_bytes,
      99u);
  EXPECT_EQ(
      std::get<ProgressReply>(RoundTrip(Response{6, Status::Ok(), ProgressReply{3, 8}}).body).total,
      8);
  {
    Thresholds t{{0.5f, 0.9f}, {1e-4f, 3e-3f}};
    auto d = std::get<Thresholds>(RoundTrip(Response{7, Status::Ok(), t}).body);
    EXPECT_EQ(d.sparsity, t.sparsity);
    EXPECT_EQ(d.threshold, t.threshold);
  }
  {
    VerifyReport v{2, 300, 1 << 20, {"context a layer 1: page 3 checksum mismatch"}};
    auto d = std::get<VerifyReport>(RoundTrip(Response{8, Status::Ok(), v}).body);
    EXPECT_EQ(d.pages_checked, 300);
    EXPECT_EQ(d.problems, v.problems);
  }
  {
    CompactReport c{1, 2, 3, 4, 5, 6};
    auto d = std::get<CompactReport>(RoundTrip(Response{9, Status::Ok(), c}).body);
    EXPECT_EQ(d.orphan_files_removed, 3);
    EXPECT_EQ(d.catalog_bytes_after, 6u);
  }
  {
    StoreStats st;
    st.contexts = 4;
    st.keys = int64_t{1} << 40;
    st.catalog_bytes = 77;
    st.calibrated_contexts = 2;
    auto d = std::get<StoreStats>(RoundTrip(Response{10, Status::Ok(), st}).body);
    EXPECT_EQ(d.keys, st.keys);
    EXPECT_EQ(d.catalog_bytes, 77u);
    EXPECT_EQ(d.calibrated_contexts, 2);
  }
  {
    PinList pins = {{"a", Tier::kHost}, {"b", Tier::kDevice}};
    EXPECT_EQ(std::get<PinList>(RoundTrip(Response{12, Status::Ok(), pins}).body), pins);
    TierStats t;
    t.host_hits = 5;
    t.host_capacity_bytes = uint64_t{1} << 30;
    t.disk_direct_bytes = 77;
    t.disk_read_us_log2 = {0, 3, 9, 1};
    t.device_layers_evicted = 2;
    t.device_hits = 31;
    t.device_bytes_uploaded = 1 << 20;
    t.index_layers_cached = 3;
    t.index_bytes_cached = 123456;
    t.index_capacity_bytes = uint64_t{1} << 31;
    t.index_layers_decoded = 9;
    t.index_layers_evicted = 6;
    auto d = std::get<TierStats>(RoundTrip(Response{13, Status::Ok(), t}).body);
    EXPECT_EQ(d.host_hits, 5u);
    EXPECT_EQ(d.host_capacity_bytes, t.host_capacity_bytes);
    EXPECT_EQ(d.disk_direct_bytes, 77u);
    EXPECT_EQ(d.disk_read_us_log2, t.disk_read_us_log2);
    EXPECT_EQ(d.device_layers_evicted, 2u);
    EXPECT_EQ(d.device_hits, 31u);
    EXPECT_EQ(d.device_bytes_uploaded, 1u << 20);
    EXPECT_EQ(d.index_layers_cached, 3u);
    EXPECT_EQ(d.index_bytes_cached, 123456u);
    EXPECT_EQ(d.index_capacity_bytes, t.index_capacity_bytes);
    EXPECT_EQ(d.index_layers_decoded, 9u);
    EXPECT_EQ(d.index_layers_evicted, 6u);
    QueryResult q;
    q.stats.pages_from_host = 11;
    q.stats.pages_from_device = 12;
    auto dq = std::get<QueryResult>(RoundTrip(Response{14, Status::Ok(), q}).body);
    EXPECT_EQ(dq.stats.pages_from_host, 11);
    EXPECT_EQ(dq.stats.pages_from_device, 12);
  }
  for (Status s : {Status::InvalidArgument("a"), Status::NotFound("b"), Status::AlreadyExists("c"),
                   Status::Corruption("d"), Status::IOError("e"), Status::Unavailable("f"),
                   Status::Internal("g")}) {
    RoundTrip(Response{11, s, {}});
  }
}

TEST(CodecTest, FramingLimitsAreEnforced) {
  Limits limits;
  limits.max_message_bytes = 1 << 16;
  limits.max_segments = 4;
  // Segment count over the limit.
  uint64_t table[4] = {uint64_t{9}, 0, 0, 0};  // 10 segments
  EXPECT_TRUE(FrameTableBytes(table, limits).status().IsInvalidArgument());
  // 0xFFFFFFFF + 1 segments does not wrap around to 0.
  table[0] = 0xFFFFFFFFull;
  EXPECT_FALSE(FrameTableBytes(table, limits).ok());
  // One segment claiming more than the limit.
  table[0] = uint64_t{1 << 14} << 32;  // 2^14 words = 128 KiB
  ASSERT_TRUE(FrameTableBytes(table, limits).ok());
  EXPECT_TRUE(FrameBytes(table, 8, limits).status().IsInvalidArgument());
  // Several segments whose sum (not any one) exceeds the limit.
  table[0] = 2 | (uint64_t{3000} << 32);  // 3 segments, 3000 words
  table[1] = 3000 | (uint64_t{3000} << 32);
  ASSERT_EQ(*FrameTableBytes(table, limits), 16u);
  EXPECT_FALSE(FrameBytes(table, 16, limits).ok());
  // An encoded message larger than the decoder's limit is refused.
  QueryCall big;
  big.name = "x";
  big.q_heads = 1;
  big.n = 1;
  big.head_dim = 1 << 15;
  big.q.assign(1 << 15, 1.f);
  std::vector<uint64_t> frame;
  ASSERT_TRUE(EncodeRequest(Request{1, 0, big}, &frame).ok());
  Request out;
  EXPECT_TRUE(DecodeRequest(frame.data(), frame.size(), limits, &out).IsInvalidArgument());
}

TEST(CodecTest, InconsistentShapesAndNamesAreRejected) {
  QueryCall c;
  c.name = "x";
  c.q_heads = 2;
  c.n = 2;
  c.head_dim = 4;
  c.q.assign(15, 1.f);  // one short of 2*2*4
  std::vector<uint64_t> frame;
  ASSERT_TRUE(EncodeRequest(Request{1, 0, c}, &frame).ok());
  Request out;
  EXPECT_TRUE(DecodeRequest(frame.data(), frame.size(), Limits(), &out).IsInvalidArgument());

  c.q_heads = 1 << 30;  // overflowing shapes
  c.n = 1 << 30;
  c.head_dim = 1 << 30;
  ASSERT_TRUE(EncodeRequest(Request{1, 0, c}, &frame).ok());
  EXPECT_TRUE(DecodeRequest(frame.data(), frame.size(), Limits(), &out).IsInvalidArgument());

  ImportBeginCall b;
  b.name = "doc";
  b.file_name = "../../etc/passwd";
  ASSERT_TRUE(EncodeRequest(Request{1, 0, b}, &frame).ok());
  EXPECT_TRUE(DecodeRequest(frame.data(), frame.size(), Limits(), &out).IsInvalidArgument());
  // The server keeps the upload under the file name: one over NAME_MAX is the client's error
  // (it was a server I/O error naming the server's upload path).
  b.file_name = std::string(255, 'a');
  ASSERT_TRUE(EncodeRequest(Request{1, 0, b}, &frame).ok());
  EXPECT_TRUE(DecodeRequest(frame.data(), frame.size(), Limits(), &out).ok());
  b.file_name = std::string(256, 'a');
  ASSERT_TRUE(EncodeRequest(Request{1, 0, b}, &frame).ok());
  const Status s = DecodeRequest(frame.data(), frame.size(), Limits(), &out);
  EXPECT_TRUE(s.IsInvalidArgument()) << s.ToString();
  EXPECT_NE(s.message().find("import file name is longer than 255 bytes"), std::string::npos)
      << s.ToString();
}

TEST(CodecTest, LongRequestListsAreRefusedBeforeAllocating) {
  // More layers of calibration queries than any model has, each well-formed.
  CalibrateCall c;
  c.name = "doc";
  c.use_stored_queries = false;
  constexpr size_t kTooManyLayers = 5000;
  c.queries.resize(kTooManyLayers, WindowQueries{1, 1, 1, {0.5f}});
  c.sparsities = {0.5f};
  std::vector<uint64_t> frame;
  ASSERT_TRUE(EncodeRequest(Request{1, 0, c}, &frame).ok());
  Request out;
  Status s = DecodeRequest(frame.data(), frame.size(), Limits(), &out);
  EXPECT_TRUE(s.IsInvalidArgument()) << s.ToString();
  EXPECT_NE(s.message().find("5000 layers; the limit is 4096"), std::string::npos) << s.ToString();
  c.queries.resize(4096);  // the limit itself is fine
  ASSERT_TRUE(EncodeRequest(Request{1, 0, c}, &frame).ok());
  s = DecodeRequest(frame.data(), frame.size(), Limits(), &out);
  EXPECT_TRUE(s.ok()) << s.ToString();
  EXPECT_EQ(std::get<CalibrateCall>(out.call).queries.size(), 4096u);

  // A list of empty structs: a million elements in 4 MiB. Refused on its length alone (before,
  // a vector of a million WindowQueries was allocated first).
  constexpr uint32_t kEmptyElements = 1 << 20;
  frame = testing::EmptyStructsCalibrateFrame(kEmptyElements);
  s = DecodeRequest(frame.data(), frame.size(), Limits(), &out);
  EXPECT_TRUE(s.IsInvalidArgument()) << s.ToString();
  EXPECT_NE(s.message().find("1048576 layers; the limit is 4096"), std::string::npos)
      << s.ToString();

  c.queries.resize(1);
  c.sparsities.assign(2000, 0.5f);
  ASSERT_TRUE(EncodeRequest(Request{1, 0, c}, &frame).ok());
  s = DecodeRequest(frame.data(), frame.size(), Limits(), &out);
  EXPECT_TRUE(s.IsInvalidArgument()) << s.ToString();
  EXPECT_NE(s.message().find("2000 calibration sparsities; the limit is 1024"), std::string::npos)
      << s.ToString();
}

TEST(CodecTest, PeekReadsTheIdAndWhetherTheCallIsHello) {
  std::vector<uint64_t> frame;
  ASSERT_TRUE(EncodeRequest(Request{41, 0, HelloCall{kProtocolVersion, "t", "c"}}, &frame).ok());
  RequestHead head;
  ASSERT_TRUE(PeekRequest(frame.data(), frame.size(), Limits(), &head).ok());
  EXPECT_EQ(head.id, 41u);
  EXPECT_TRUE(head.is_hello);
  ASSERT_TRUE(EncodeRequest(Request{42, 0, ListCall{}}, &frame).ok());
  ASSERT_TRUE(PeekRequest(frame.data(), frame.size(), Limits(), &head).ok());
  EXPECT_EQ(head.id, 42u);
  EXPECT_FALSE(head.is_hello);
  EXPECT_TRUE(PeekRequest(frame.data(), frame.size() - 1, Limits(), &head).IsInvalidArgument());
}

TEST(CodecTest, TruncatedAndRandomFramesAreErrorsNotCrashes) {
  std::mt19937_64 rng(FreshSeed());
  QueryCall c;
  c.name = "ctx";
  c.q_heads = 4;
  c.n = 1;
  c.head_dim = 32;
  c.q = RandomNormal(128, rng);
  std::vector<uint64_t> frame;
  ASSERT_TRUE(EncodeRequest(Request{1, 0, c}, &frame).ok());
  Request out;
  for (size_t words = 0; words < frame.size(); ++words) {  // every truncation
    EXPECT_FALSE(DecodeRequest(frame.data(), words, Limits(), &out).ok()) << words;
  }
  // Bit flips anywhere: decode may succeed or fail, but must return.
  constexpr int kFlips = 3000;
  for (int i = 0; i < kFlips; ++i) {
    std::vector<uint64_t> bad = frame;
    const size_t bit = rng() % (bad.size() * 64);
    bad[bit / 64] ^= uint64_t{1} << (bit % 64);
    Request r;
    DecodeRequest(bad.data(), bad.size(), Limits(), &r).PermitUncheckedError();
    Response a;
    DecodeResponse(bad.data(), bad.size(), Limits(), &a).PermitUncheckedError();
  }
  // Random words behind a valid one-segment table.
  constexpr int kRandomFrames = 2000;
  for (int i = 0; i < kRandomFrames; ++i) {
    const size_t words = 1 + rng() % 64;
    std::vector<uint64_t> junk(words + 1);
    junk[0] = uint64_t{words} << 32;
    for (size_t w = 1; w <= words; ++w) junk[w] = rng();
    Request r;
    DecodeRequest(junk.data(), junk.size(), Limits(), &r).PermitUncheckedError();
    Response a;
    DecodeResponse(junk.data(), junk.size(), Limits(), &a).PermitUncheckedError();
  }
}

TEST(CodecTest, CallKindNamesCoverEveryCall) {
  for (size_t k = 0; k < kNumCallKinds; ++k) EXPECT_STRNE(CallKindName(k), "unknown") << k;
  EXPECT_STREQ(CallKindName(1), "query");
  EXPECT_STREQ(CallKindName(kNumCallKinds), "unknown");
}

}  // namespace
}  // namespace sqkv::net
