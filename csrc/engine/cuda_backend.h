// The engine's CUDA backend, on the host side: lays the call's tensors out for
// gradclip._cuda's kernels (reached through its Api table, cuda/api.h), gets
// device memory from the caller's framework (DeviceAllocator), and launches
// the stages. Results stay on the device unless a report is asked for; then
// the host waits once and reads them back. Nothing here recomputes a rule
// the kernels applied.
#pragma once

#include <functional>
#include <vector>

#include "cuda/api.h"
#include "engine/engine.h"

namespace gradclip::engine {

struct DeviceBuffers {
  char* out;        // output bytes
  void* workspace;  // workspace bytes
  void* stream;     // cudaStream_t to launch on
};

// What the backend needs from the binding: device memory on the tensors'
// device from whoever owns it (the caller's framework, so that its caching
// allocator owns every byte), and a way to wait (launches block when the
// launch queue is full; a read-back waits for the device) without holding up
// the interpreter.
class DeviceResources {
 public:
  virtual DeviceBuffers allocate(int64_t out_bytes, int64_t workspace_bytes) = 0;
  virtual void unlocked(const std::function<void()>& work) = 0;

 protected:
  ~DeviceResources() = default;
};

class CudaBackend final : public Backend {
 public:
  CudaBackend(const std::vector<Span>& spans, int32_t device, const cuda::Api& api, DeviceResources& resources);

  void reduce(const Request& req) override;
  GroupPartials group_partials(const Request& req) override;
  Summary summary(const Request& req) override;
  Outcome finish(const Request& req, const Span* combined) override;

 private:
  struct Layout;
  Layout plan_outputs(const Request& req, bool report, bool seam) const;
  // Launches `stages`; returns where the outputs are.
  Layout launch(const Request& req, uint32_t stages, bool report, bool seam, const Span* combined);
  std::vector<char> read_back(const Layout& layout);

  const std::vector<Span>& spans_;
  int32_t device_;
  const cuda::Api& api_;
  DeviceResources& resources_;
  std::vector<cuda::DeviceTensor> tensors_;
  bool reduced_ = false;         // the partials are in workspace_
  void* workspace_ = nullptr;
  void* stream_ = nullptr;
  char* seam_out_ = nullptr;     // the reduce launch's outputs (group partials, total, nonfinite)
  int64_t seam_total_ = -1, seam_nonfinite_ = -1;
};

}  // namespace gradclip::engine
