// Built when SQKV_WITH_CUDA=OFF: there is never a device, so there is never an engine.
#include "gpu/engine.h"

namespace sqkv::gpu {

Status Engine::Create(const EngineOptions&, std::unique_ptr<Engine>*) {
  return Status::Unavailable("this build has no GPU support (built with SQKV_WITH_CUDA=OFF)");
}

}  // namespace sqkv::gpu
