// The inner-product step of the GPU K-means: cuBLAS (loaded with dlopen, so that no binary of
// the store needs libcublas to start, and none has to carry its ~600 MB), or a built-in FP32
// tiled kernel when the library is absent.
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <dlfcn.h>

#include <memory>
#include <string>
#include <type_traits>

#include "gpu/kmeans_internal.cuh"

namespace sqkv::gpu::kmeans_detail {
namespace {

// The four entry points used, with the signatures of cublas_api.h (declared here because the
// header overloads cublasGemmEx for C++, so decltype cannot name it).
using CreateFn = cublasStatus_t (*)(cublasHandle_t*);
using DestroyFn = cublasStatus_t (*)(cublasHandle_t);
using SetStreamFn = cublasStatus_t (*)(cublasHandle_t, cudaStream_t);
using GemmExFn = cublasStatus_t (*)(cublasHandle_t, cublasOperation_t, cublasOperation_t, int, int,
                                    int, const void*, const void*, cudaDataType, int, const void*,
                                    cudaDataType, int, const void*, void*, cudaDataType, int,
                                    cublasComputeType_t, cublasGemmAlgo_t);

struct CublasApi {
  CreateFn create = nullptr;
  DestroyFn destroy = nullptr;
  SetStreamFn set_stream = nullptr;
  GemmExFn gemm_ex = nullptr;
  std::string error;  // why the library is unusable; empty when it loaded
};

// Loaded once per process and never unloaded. The soname's major version is the one built
// against; the toolkit's default folder is tried when the loader's search path lacks it.
const CublasApi& Cublas() {
  static const CublasApi api = [] {
    CublasApi a;
    const std::string soname = "libcublas.so." + std::to_string(CUBLAS_VER_MAJOR);
    void* lib = nullptr;
    for (const std::string& name : {soname, "/usr/local/cuda/lib64/" + soname}) {
      lib = dlopen(name.c_str(), RTLD_NOW | RTLD_LOCAL);
      if (lib != nullptr) break;
    }
    if (lib == nullptr) {
      const char* why = dlerror();
      a.error = "cannot load " + soname + ": " + (why != nullptr ? why : "not found");
      return a;
    }
    auto sym = [&](const char* name, auto* fn) {
      *fn = reinterpret_cast<std::remove_pointer_t<decltype(fn)>>(dlsym(lib, name));
      if (*fn == nullptr && a.error.empty()) a.error = soname + " lacks " + name;
    };
    sym("cublasCreate_v2", &a.create);
    sym("cublasDestroy_v2", &a.destroy);
    sym("cublasSetStream_v2", &a.set_stream);
    sym("cublasGemmEx", &a.gemm_ex);
    return a;
  }();
  return api;
}

Status CublasStatus(cublasStatus_t st, const char* what) {
  if (st == CUBLAS_STATUS_SUCCESS) return Status::Ok();
  return Status::Internal(std::string("kmeans: ") + what + ": cublas status " +
                          std::to_string(static_cast<int>(st)));
}

class CublasGemm final : public Gemm {
 public:
  CublasGemm(const CublasApi& api, cublasHandle_t handle) : api_(api), handle_(handle) {}
  ~CublasGemm() override { api_.destroy(handle_); }
  CublasGemm(const CublasGemm&) = delete;
  CublasGemm& operator=(const CublasGemm&) = delete;

  Status Run(const float* a, int rows, const float* b, int cols, int d, float* s, int lds,
             bool tf32) override {
    // Column-major view: s (cols × rows, ld lds) = bᵀ-as-stored (cols × d) · a-as-stored (d × rows).
    const float one = 1.f, zero = 0.f;
    return CublasStatus(
        api_.gemm_ex(handle_, CUBLAS_OP_T, CUBLAS_OP_N, cols, rows, d, &one, b, CUDA_R_32F, d, a,
                     CUDA_R_32F, d, &zero, s, CUDA_R_32F, lds,
                     tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F,
                     CUBLAS_GEMM_DEFAULT),
        "cublasGemmEx");
  }
  bool cublas() const override { return true; }

 private:
  const CublasApi& api_;
  cublasHandle_t handle_;
};

// Built-in product: 64 × 64 output tiles, 256 threads of 4 × 4 outputs each, d in steps of 16
// staged transposed in shared memory (each thread then reads broadcast rows). FP32 throughout.
constexpr int kTile = 64;
constexpr int kStep = 16;
constexpr int kThreads = 256;
constexpr int kMicro = 4;

__global__ void __launch_bounds__(kThreads)
    BuiltinGemmKernel(const float* __restrict__ a, int rows, const float* __restrict__ b, int cols,
                      int d, float* __restrict__ s, int lds) {
  __shared__ float as[kStep][kTile + 4];
  __shared__ float bs[kStep][kTile + 4];
  const int t = threadIdx.x;
  const int row0 = blockIdx.y * kTile, col0 = blockIdx.x * kTile;
  const int ty = t / (kTile / kMicro), tx = t % (kTile / kMicro);
  float acc[kMicro][kMicro] = {};
  for (int k0 = 0; k0 < d; k0 += kStep) {
    // Each thread stages 4 elements of each tile: tile row e / kStep, column e % kStep.
#pragma unroll
    for (int q = 0; q < kTile * kStep / kThreads; ++q) {
      const int e = t + q * kThreads;
      const int r = e / kStep, c = e % kStep;
      const bool in_k = k0 + c < d;
      as[c][r] = in_k && row0 + r < rows ? a[static_cast<int64_t>(row0 + r) * d + k0 + c] : 0.f;
      bs[c][r] = in_k && col0 + r < cols ? b[static_cast<int64_t>(col0 + r) * d + k0 + c] : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kStep; ++kk) {
      float av[kMicro], bv[kMicro];
#pragma unroll
      for (int i = 0; i < kMicro; ++i) av[i] = as[kk][ty * kMicro + i];
#pragma unroll
      for (int j = 0; j < kMicro; ++j) bv[j] = bs[kk][tx * kMicro + j];
#pragma unroll
      for (int i = 0; i < kMicro; ++i)
#pragma unroll
        for (int j = 0; j < kMicro; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < kMicro; ++i) {
    const int r = row0 + ty * kMicro + i;
    if (r >= rows) continue;
#pragma unroll
    for (int j = 0; j < kMicro; ++j) {
      const int c = col0 + tx * kMicro + j;
      if (c < cols) s[static_cast<int64_t>(r) * lds + c] = acc[i][j];
    }
  }
}

class BuiltinGemm final : public Gemm {
 public:
  explicit BuiltinGemm(cudaStream_t stream) : stream_(stream) {}
  Status Run(const float* a, int rows, const float* b, int cols, int d, float* s, int lds,
             bool /*tf32: FP32 only*/) override {
    const dim3 grid((cols + kTile - 1) / kTile, (rows + kTile - 1) / kTile);
    BuiltinGemmKernel<<<grid, kThreads, 0, stream_>>>(a, rows, b, cols, d, s, lds);
    return CudaStatus(cudaGetLastError(), "built-in product kernel");
  }
  bool cublas() const override { return false; }

 private:
  cudaStream_t stream_;
};

}  // namespace

Status MakeCublasGemm(cudaStream_t stream, std::unique_ptr<Gemm>* out) {
  const CublasApi& api = Cublas();
  if (!api.error.empty()) return Status::Unavailable("gpu kmeans: " + api.error);
  cublasHandle_t handle = nullptr;
  SQKV_RETURN_IF_ERROR(CublasStatus(api.create(&handle), "cublasCreate"));
  auto gemm = std::make_unique<CublasGemm>(api, handle);  // owns the handle from here
  SQKV_RETURN_IF_ERROR(CublasStatus(api.set_stream(handle, stream), "cublasSetStream"));
  *out = std::move(gemm);
  return Status::Ok();
}

std::unique_ptr<Gemm> MakeBuiltinGemm(cudaStream_t stream) {
  return std::make_unique<BuiltinGemm>(stream);
}

}  // namespace sqkv::gpu::kmeans_detail
