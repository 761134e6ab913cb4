# The SqueezeKV wire protocol: one Request message answered by one or more Response messages
# (more than one only for long calls, which send progress before their answer), over a byte stream
# in Cap'n Proto's standard stream framing (segment table, then segments; no packing).
#
# A connection carries one request at a time: the client sends a Request and reads Responses
# carrying the same id until one that is not `progress`. With a token configured on the
# server, the first request of a connection must be `hello` carrying it.
#
# Tensors travel as Data fields holding little-endian float32 in C order; each field's comment
# gives its shape. Adding a call: a new member of both unions with the next ordinal. Old servers
# answer an unknown call with an `invalidArgument` error; the connection stays usable.
@0xa18a526776c2860a;

using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("sqkv::net::wire");

# Version history (client and server must agree; the server refuses another in `hello`):
#   1  the first protocol;
#   2  status `cancelled` (a call cancelled by its deadline, its client's disconnect or the
#      server's stop), which a version-1 peer would read as an unknown status.
const protocolVersion :UInt32 = 2;

struct Request {
  id @0 :UInt64;
  # Chosen by the client; echoed in every Response to this request.

  deadlineMs @1 :UInt32;
  # How long the server may work on this request before answering `unavailable` (deadline
  # exceeded); 0 means the server's default (--deadline-ms, 60 s; none for long calls). A call not
  # yet started when it passes is never started; a running query stops at its next kv head or
  # block of 1,024 rows, an import or rebuild at its next (layer, kv head), and other calls run to
  # their end; the connection's next request is read only after that.

  union {
    hello @2 :Hello;
    # Opens a session: protocol check and authentication.

    query @3 :QueryCall;
    # Store::Query.

    list @4 :Void;
    # Store::List.

    info @5 :Text;
    # Store::Info of the named context.

    remove @6 :Text;
    # Store::Remove of the named context.

    importBegin @7 :ImportBegin;
    # Starts an upload for Store::Import; answered with the upload's id.

    importChunk @8 :ImportChunk;
    # Appends bytes to an upload.

    importEnd @9 :ImportEnd;
    # Finishes an upload and imports it; answered by progress, then the imported context.

    rebuild @10 :RebuildCall;
    # Store::Rebuild; answered by progress, then the new version's context.

    calibrate @11 :CalibrateCall;
    # Store::Calibrate.

    getThresholds @12 :GetThresholdsCall;
    # Store::GetThresholds.

    verify @13 :Text;
    # Store::Verify of the named context (all when empty); answered by progress, then the report.

    compact @14 :Void;
    # Store::Compact.

    stats @15 :Void;
    # Store::Stats.

    pin @16 :TierCall;
    # Store::Pin: keep the context resident in a tier (loads it now).

    unpin @17 :Text;
    # Store::Unpin of the named context.

    preload @18 :TierCall;
    # Store::Preload: warm the context into a tier without pinning it.

    listPins @19 :Void;
    # Store::ListPins.

    tierStats @20 :Void;
    # Store::GetTierStats.
  }
}

enum Tier {
  host @0;
  # The host page cache.
  device @1;
  # The GPU's page pool.
}

struct TierCall {
  name @0 :Text;
  # Context name.
  tier @1 :Tier;
  # Where to keep it.
}

struct Hello {
  protocolVersion @0 :UInt32;
  # The client's `protocolVersion`; the server refuses another.

  token @1 :Data;
  # The shared secret of the server's --auth-token-file; empty when the client has none.

  client @2 :Text;
  # Free-form client description for logs, e.g. "sqkv-cli 0.1.0".
}

enum Device {
  auto @0;
  # The GPU when the server has one, else the CPU.
  cpu @1;
  gpu @2;
}

enum SelectMode {
  keepFraction @0;
  # Whole clusters in descending score until keepFraction of the keys are kept.
  threshold @1;
  # Every cluster whose per-key score is at least `threshold`.
  dense @2;
  # Every key.
}

struct QueryCall {
  name @0 :Text;
  # Context name.

  layer @1 :Int32;
  # Layer of the context the queries belong to.

  qHeads @2 :Int32;
  # Query heads; a multiple of the context's kv heads.

  n @3 :Int32;
  # Query tokens per head.

  headDim @4 :Int32;
  # Must equal the context's head_dim.

  q @5 :Data;
  # (qHeads, n, headDim) float32 little-endian.

  mode @6 :SelectMode;
  # Which clusters to attend to.

  keepFraction @7 :Float32;
  # For mode keepFraction, in [0, 1].

  threshold @8 :Float32;
  # For mode threshold.

  l1KeepFraction @9 :Float32;
  # Hierarchical indexes: level-1 keep fraction; 0 chooses automatically.

  device @10 :Device;
  # Where the server computes the answer.

  wantSelection @11 :Bool;
  # Return the attended token positions per kv head.

  sparsity @12 :Float32 = -1;
  # When >= 0: keep the clusters reaching the layer's calibrated threshold for this sparsity
  # (overrides mode); -1: off.
}

struct QueryStats {
  device @0 :Text;
  # "cpu" or "gpu".
  tokensSelected @1 :Int64;
  # Summed over kv heads.
  pagesSelected @2 :Int64;
  # Pages under the selected clusters, summed over kv heads.
  centroidsScored @3 :Int64;
  # Centroids scored, summed over kv heads.
  pagesFromDisk @4 :Int64;
  # Pages that were read from the segment file (not from a cache).
  diskBytesRead @5 :Int64;
  # Bytes read from the segment file.
  totalMs @6 :Float64;
  # Time the store spent on the query (the server's overhead is not included).
  pagesFromHost @7 :Int64;
  # Pages found in the host page cache.
  pagesFromDevice @8 :Int64;
  # Pages already resident in the device pool.
}

struct QueryReply {
  output @0 :Data;
  # (qHeads, n, headDim) float32 little-endian.

  lse @1 :Data;
  # (qHeads, n) float32 little-endian: natural-log log-sum-exp of the scaled scores.

  selectedTokens @2 :List(List(Int32));
  # (kv_heads) sorted original token positions attended to; empty unless wantSelection.

  stats @3 :QueryStats;
  # The store's counters for this query.
}

struct ImportOptions {
  centroidFraction @0 :Float32;
  # Level-2 centroids per kv head as a fraction of the tokens, in (0, 1].
  pageTokens @1 :Int32;
  # Token slots per page.
  levels @2 :Int32;
  # 1 or 2 index levels.
  l1Fraction @3 :Float32;
  # With 2 levels: level-1 parents as a fraction of the tokens.
  kmeansIterations @4 :Int32;
  # K-means iterations.
  kmeansDevice @5 :Device;
  # Where the server runs K-means (auto: its GPU when it has one).
}

struct ImportBegin {
  name @0 :Text;
  # Name of the context to create.

  fileName @1 :Text;
  # Base name of the client's file (recorded as the context's source); no directories.

  totalBytes @2 :UInt64;
  # Exact size of the upload; importEnd fails unless this many bytes arrived.

  options @3 :ImportOptions;
  # Index parameters.
}

struct ImportChunk {
  uploadId @0 :UInt64;
  # From the importBegin reply.

  offset @1 :UInt64;
  # Byte offset of `data` in the file; chunks arrive in order, without gaps.

  data @2 :Data;
  # Bytes of the file; at most the server's chunk size (from the importBegin reply).
}

struct RebuildCall {
  name @0 :Text;
  # Context to re-cluster.
  options @1 :ImportOptions;
  # New index parameters.
}

struct WindowQueries {
  qHeads @0 :Int32;
  # Query heads.
  window @1 :Int32;
  # Query tokens per head.
  headDim @2 :Int32;
  # Head dimension.
  data @3 :Data;
  # (qHeads, window, headDim) float32 little-endian.
}

struct CalibrateCall {
  name @0 :Text;
  # Context to calibrate.
  useStoredQueries @1 :Bool;
  # True: calibrate from the window queries stored at import (`queries` is ignored).
  queries @2 :List(WindowQueries);
  # (layers) calibration queries of every layer.
  sparsities @3 :List(Float32);
  # Target sparsities to calibrate thresholds for.
}

struct GetThresholdsCall {
  name @0 :Text;
  # Context name.
  layer @1 :Int32;
  # Layer whose thresholds are wanted.
}

struct ImportEnd {
  uploadId @0 :UInt64;
  # From the importBegin reply; the upload is consumed (imported or not) and its file removed.
}

enum StatusCode {
  # The codes of common/status.h.
  ok @0;
  invalidArgument @1;
  notFound @2;
  alreadyExists @3;
  corruption @4;
  ioError @5;
  unavailable @6;
  internal @7;
  cancelled @8;
}

struct Status {
  code @0 :StatusCode;
  # What kind of failure; ok on success.
  message @1 :Text;
  # What failed, for people.
}

struct Context {
  # A context's catalog record (storage/catalog.h ContextRecord).
  name @0 :Text;
  # Context name.
  version @1 :UInt64;
  # Version number of the stored index.
  layers @2 :Int32;
  # Layers.
  kvHeads @3 :Int32;
  # KV heads per layer.
  tokens @4 :Int32;
  # Tokens of the context.
  headDim @5 :Int32;
  # Head dimension.
  pageTokens @6 :Int32;
  # Token slots per page.
  dtype @7 :Text;
  # Stored element type: "f32", "f16" or "bf16".
  centroidFraction @8 :Float32;
  # Index parameter the version was built with.
  levels @9 :Int32;
  # Index levels.
  l1Fraction @10 :Float32;
  # Level-1 fraction (0 with one level).
  layerFirstPage @11 :List(UInt64);
  # (layers + 1) first segment page of each layer; the last entry is the page count.
  segmentBytes @12 :UInt64;
  # Size of the segment file.
  indexBytes @13 :UInt64;
  # Size of the encoded indexes and checksums.
  windowQHeads @14 :Int32;
  # Shape of the stored window queries; 0 when none.
  window @15 :Int32;
  # Window queries per head.
  createdUnix @16 :Int64;
  # Creation time, seconds since the epoch.
  buildSeconds @17 :Float64;
  # Import duration.
  source @18 :Text;
  # The file the context was imported from (on the server's side).
  kmeans @19 :Text;
  # Where the index was clustered: "cpu", "gpu" or "gpu (cpu fallback)"; empty for older records.
}

struct HelloReply {
  protocolVersion @0 :UInt32;
  # The server's `protocolVersion`.
  server @1 :Text;
  # Free-form server description, e.g. "sqkv-serve 0.1.0".
  maxMessageBytes @2 :UInt64;
  # Largest message the server accepts.
}

struct ImportBeginReply {
  uploadId @0 :UInt64;
  # Names the upload in importChunk and importEnd.
  chunkBytes @1 :UInt32;
  # Largest `data` the server accepts in one importChunk.
}

struct Progress {
  done @0 :Int32;
  # Units of work done so far (for imports: (layer, kv head) pairs indexed).
  total @1 :Int32;
  # All units of work.
}

struct Thresholds {
  sparsity @0 :List(Float32);
  # Calibrated sparsities, ascending.
  threshold @1 :List(Float32);
  # The per-key score threshold of each sparsity (same length).
}

struct VerifyReport {
  contextsChecked @0 :Int32;
  # Contexts whose pages and indexes were checked.
  pagesChecked @1 :Int64;
  # Pages whose checksums were checked.
  bytesChecked @2 :Int64;
  # Bytes read for the check.
  problems @3 :List(Text);
  # One line per problem found; empty when all is well.
}

struct CompactReport {
  versionsReclaimed @0 :Int32;
  # Removed or superseded versions whose files and keys went.
  versionsInUse @1 :Int32;
  # Garbage versions kept because a reader still uses them.
  orphanFilesRemoved @2 :Int32;
  # Crash leftovers removed.
  segmentBytesReclaimed @3 :UInt64;
  # Bytes of segment files removed.
  catalogBytesBefore @4 :UInt64;
  # Catalog size before compaction.
  catalogBytesAfter @5 :UInt64;
  # Catalog size after compaction.
}

struct StoreStats {
  contexts @0 :Int32;
  # Live contexts.
  tokens @1 :Int64;
  # Sum of the contexts' tokens.
  keys @2 :Int64;
  # Sum of layers x kv heads x tokens.
  segmentBytes @3 :UInt64;
  # Live versions' segment files.
  indexBytes @4 :UInt64;
  # Live versions' encoded indexes and checksums.
  garbageSegmentBytes @5 :UInt64;
  # Removed or superseded versions awaiting compaction.
  catalogBytes @6 :UInt64;
  # The catalog directory.
  liveVersions @7 :Int32;
  # Versions that records point at.
  garbageVersions @8 :Int32;
  # Versions awaiting compaction.
  calibratedContexts @9 :Int32;
  # Contexts with calibrated thresholds.
}

struct PinnedContext {
  name @0 :Text;
  # Context name.
  tier @1 :Tier;
  # The tier it is pinned in.
}

struct TierStats {
  # Counters since the store opened; *InUse, *Capacity, *Resident and *Bytes of the pool are
  # current values.
  hostHits @0 :UInt64;
  # Pages found in the host page cache.
  hostMisses @1 :UInt64;
  # Pages that had to be read into it.
  hostEvictions @2 :UInt64;
  # Pages evicted from it.
  hostBytesInUse @3 :UInt64;
  # Bytes of the host cache holding pages.
  hostPinnedBytes @4 :UInt64;
  # Bytes held by pinned contexts.
  hostCapacityBytes @5 :UInt64;
  # Size of the host cache.
  diskReads @6 :UInt64;
  # Reads from segment files.
  diskBytes @7 :UInt64;
  # Bytes read from segment files.
  diskDirectBytes @8 :UInt64;
  # Of those, bytes read with O_DIRECT.
  diskReadUsLog2 @9 :List(UInt64);
  # Read latency histogram: entry i counts reads of [2^i, 2^(i+1)) microseconds.
  deviceLayersResident @10 :UInt64;
  # Layers resident in the device pool.
  devicePoolBytesUsed @11 :UInt64;
  # Bytes of the device pool in use.
  devicePoolBytes @12 :UInt64;
  # Size of the device pool.
  deviceLayersLoaded @13 :UInt64;
  # Layers loaded into the device pool.
  deviceLayersEvicted @14 :UInt64;
  # Layers evicted from it.
  deviceHits @15 :UInt64;
  # Pages found resident in the device pool.
  deviceMisses @16 :UInt64;
  # Pages the device pool had to upload.
  devicePagesUploaded @17 :UInt64;
  # Pages uploaded to the device pool.
  deviceBytesUploaded @18 :UInt64;
  # Bytes uploaded to the device pool.
  devicePagesEvicted @19 :UInt64;
  # Pages evicted from the device pool.
  indexLayersCached @20 :UInt64;
  # Decoded layer indexes in host memory.
  indexBytesCached @21 :UInt64;
  # Their bytes.
  indexCapacityBytes @22 :UInt64;
  # The index cache's byte bound.
  indexLayersDecoded @23 :UInt64;
  # Layer indexes read from the catalog and decoded.
  indexLayersEvicted @24 :UInt64;
  # Layer indexes dropped from the cache.
  deviceLayersPinned @25 :UInt64;
  # Of the layers resident in the device pool, those pinned (their pages are never evicted).
}

struct Response {
  id @0 :UInt64;
  # The id of the request answered; 0 when the request could not be decoded.

  status @1 :Status;
  # ok, or why the request failed (then the body is `none`).

  union {
    none @2 :Void;
    # Failed requests, remove, importChunk, calibrate, pin, unpin, preload.
    hello @3 :HelloReply;
    # Answer to hello.
    query @4 :QueryReply;
    # Answer to query.
    contexts @5 :List(Context);
    # Answer to list.
    context @6 :Context;
    # Answer to info, importEnd (the imported context) and rebuild (the new version).
    importBegin @7 :ImportBeginReply;
    # Answer to importBegin.
    progress @8 :Progress;
    # Sent during long calls (importEnd, rebuild, verify); more Responses with the same id follow.
    thresholds @9 :Thresholds;
    # Answer to getThresholds.
    verifyReport @10 :VerifyReport;
    # Answer to verify.
    compactReport @11 :CompactReport;
    # Answer to compact.
    stats @12 :StoreStats;
    # Answer to stats.
    pins @13 :List(PinnedContext);
    # Answer to listPins.
    tierStats @14 :TierStats;
    # Answer to tierStats.
  }
}
