#include "engine/cuda_backend.h"

#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>

namespace gradclip::engine {
namespace {

int64_t align8(int64_t v) { return (v + 7) / 8 * 8; }

}  // namespace

// Where one launch's outputs lie in its output buffer: byte offsets, -1 when absent.
struct CudaBackend::Layout {
  char* out = nullptr;
  int64_t bytes = 0;
  bool f64 = false;
  int64_t total = -1, per_group = -1, per_tensor = -1, coefs = -1, partials = -1, nonfinite = -1, flags = -1;
  int64_t flag_count = 0;
};

CudaBackend::CudaBackend(const std::vector<Span>& spans, int32_t device, const cuda::Api& api,
                         DeviceResources& resources)
    : spans_(spans), device_(device), api_(api), resources_(resources) {
  tensors_.resize(spans.size());
  for (size_t s = 0; s < spans.size(); ++s) tensors_[s] = {spans[s].data, spans[s].numel, spans[s].dtype, 0};
}

// The norm kernels launch with the next launch (finish's, or group_partials'):
// a plain clip is then one launch sequence.
void CudaBackend::reduce(const Request&) {}

CudaBackend::Layout CudaBackend::plan_outputs(const Request& req, bool report, bool seam) const {
  Layout l;
  const int64_t n = int64_t(spans_.size()), groups = req.n_groups();
  // A report, and a reduction's total (read by the host for an adaptive
  // limit), are read in float64; device results have the inputs' result dtype
  // (float64 when an input is, else float32).
  l.f64 = report || seam || !req.total_as_float32;
  const int64_t es = l.f64 ? 8 : 4;
  const bool norms = req.reduces();
  int64_t at = 0;
  auto take = [&](int64_t bytes) {
    const int64_t offset = at;
    at = align8(at + bytes);
    return offset;
  };
  if (norms || seam) l.total = take(es);
  if ((report && req.groups.n_groups > 0) || seam) l.per_group = take(es * groups);
  if (report || (norms && req.want_per_span)) l.per_tensor = take(es * n);
  if (report && req.kind != ClipKind::kNone && req.kind != ClipKind::kValue) l.coefs = take(8 * (n > groups ? n : groups));
  if (seam) l.partials = take(int64_t(sizeof(Partial)) * groups);
  if (report || seam) l.nonfinite = take(1);
  if (req.kind == ClipKind::kValue && (report || req.want_changed)) {
    l.flag_count = api_.changed_flag_count(tensors_.data(), n);
    l.flags = take(l.flag_count);
  }
  l.bytes = at;
  return l;
}

CudaBackend::Layout CudaBackend::launch(const Request& req, uint32_t stages, bool report, bool seam,
                                        const Span* combined) {
  if (req.nonfinite == Nonfinite::kZero)
    throw std::invalid_argument("nonfinite='zero' is not available for CUDA tensors yet; use 'propagate', 'error' or "
                                "'skip'");
  if (req.n_groups() > api_.max_groups)
    throw std::invalid_argument("at most " + std::to_string(api_.max_groups) + " groups per call on CUDA, got " +
                                std::to_string(req.n_groups()));
  const int64_t n = int64_t(tensors_.size());
  for (int64_t s = 0; s < n; ++s) tensors_[s].group = req.group_of(size_t(s));

  cuda::Request r;
  r.stages = stages;
  r.kind = req.kind;
  r.order = req.order;
  r.eps = req.eps;
  r.limits = req.limits.empty() ? nullptr : req.limits.data();
  r.n_groups = req.n_groups();
  r.nonfinite = req.nonfinite;
  r.total_as_float32 = req.total_as_float32;
  if (combined) {
    r.combined = static_cast<const Partial*>(combined->data);
    r.n_combined = static_cast<int32_t>(combined->numel / (2 * int64_t(req.n_groups())));
  }
  if (req.given.present) {
    if (req.given.in_memory) {
      r.norm = req.given.in_memory->data;
      r.norm_dtype = req.given.in_memory->dtype;
    } else {
      r.coef = coefficient(req.kind, req.limits[0], req.given.value, req.eps);
    }
  }

  Layout l = plan_outputs(req, report, seam);
  const bool new_workspace = (stages & cuda::kReduce) != 0;
  const int64_t ws_bytes = new_workspace ? api_.workspace_bytes(tensors_.data(), n, &r) : 0;
  const DeviceBuffers b = resources_.allocate(l.bytes, ws_bytes);
  if (new_workspace) workspace_ = b.workspace;
  stream_ = b.stream;
  l.out = b.out;
  r.workspace = workspace_;
  r.device = device_;
  r.stream = stream_;
  r.out.out_f64 = l.f64;
  if (l.total >= 0) r.out.total = l.out + l.total;
  if (l.per_group >= 0) r.out.per_group = l.out + l.per_group;
  if (l.per_tensor >= 0) r.out.per_tensor = l.out + l.per_tensor;
  if (l.coefs >= 0) r.out.coefs = reinterpret_cast<double*>(l.out + l.coefs);
  if (l.partials >= 0) r.out.group_partials = reinterpret_cast<Partial*>(l.out + l.partials);
  if (l.nonfinite >= 0) r.out.nonfinite = reinterpret_cast<uint8_t*>(l.out + l.nonfinite);
  if (l.flags >= 0) r.out.changed_blocks = reinterpret_cast<uint8_t*>(l.out + l.flags);

  const char* error = nullptr;
  resources_.unlocked([&] { error = api_.launch(tensors_.data(), n, &r); });
  if (error) throw std::runtime_error(std::string("gradclip CUDA: ") + error);
  if (stages & cuda::kReduce) reduced_ = true;
  return l;
}

std::vector<char> CudaBackend::read_back(const Layout& l) {
  std::vector<char> host(size_t(l.bytes));
  const char* error = nullptr;
  if (l.bytes > 0)
    resources_.unlocked([&] { error = api_.copy_to_host(host.data(), l.out, l.bytes, device_, stream_); });
  if (error) throw std::runtime_error(std::string("gradclip CUDA: ") + error);
  return host;
}

GroupPartials CudaBackend::group_partials(const Request& req) {
  Request fold = req;  // the norms and partials only: no coefficient, nothing written
  fold.kind = ClipKind::kNone;
  const Layout l = launch(fold, cuda::kReduce | cuda::kFinalize, false, true, nullptr);
  seam_out_ = l.out;
  seam_total_ = l.total;
  seam_nonfinite_ = l.nonfinite;
  GroupPartials out;
  out.device_offset = l.partials;
  return out;
}

Backend::Summary CudaBackend::summary(const Request& req) {
  if (!seam_out_) group_partials(req);
  double total = 0.0;
  uint8_t nonfinite = 0;
  const char* error = nullptr;
  resources_.unlocked([&] {
    error = api_.copy_to_host(&total, seam_out_ + seam_total_, 8, device_, stream_);  // float64 (plan_outputs)
    if (!error) error = api_.copy_to_host(&nonfinite, seam_out_ + seam_nonfinite_, 1, device_, stream_);
  });
  if (error) throw std::runtime_error(std::string("gradclip CUDA: ") + error);
  return {total, nonfinite != 0};
}

Outcome CudaBackend::finish(const Request& req, const Span* combined) {
  uint32_t stages = 0;
  if (req.reduces()) stages |= (reduced_ ? 0u : uint32_t(cuda::kReduce)) | cuda::kFinalize;
  if (req.kind != ClipKind::kNone) stages |= cuda::kApply;
  const bool report = req.want_report;
  const Layout l = launch(req, stages, report, false, combined);

  Outcome out;
  if (!report) {
    DeviceResults& d = out.device;
    d.present = true;
    d.f64 = l.f64;
    d.total_offset = l.total;
    d.tensor_offset = l.per_tensor;
    d.group_offset = l.per_group;
    d.flags_offset = l.flags;
    d.flag_count = l.flag_count;
    return out;
  }
  // A report: everything the kernels decided, read back in one wait.
  const std::vector<char> host = read_back(l);
  auto at = [&](int64_t offset, size_t i) {
    double v;
    std::memcpy(&v, host.data() + offset + 8 * i, 8);
    return v;
  };
  const size_t n = spans_.size();
  out.total = at(l.total, 0);
  out.per_span.resize(n);
  out.nonfinite_spans.resize(n);
  for (size_t s = 0; s < n; ++s) {
    out.per_span[s] = at(l.per_tensor, s);
    out.nonfinite_spans[s] = !std::isfinite(out.per_span[s]);
  }
  if (l.per_group >= 0)
    for (int32_t g = 0; g < req.n_groups(); ++g) out.per_group.push_back(at(l.per_group, g));
  out.nonfinite = host[size_t(l.nonfinite)] != 0;
  out.held = holds(req.nonfinite, out.nonfinite);
  if (req.kind == ClipKind::kValue) {
    for (int64_t f = 0; f < l.flag_count; ++f) out.changed |= host[size_t(l.flags + f)] != 0;
    out.written = out.changed;
    return out;
  }
  if (l.coefs < 0) return out;
  out.span_coefs.resize(n);
  if (per_group_coefficient(req.kind)) {
    for (int32_t g = 0; g < req.n_groups(); ++g) out.group_coefs.push_back(at(l.coefs, g));
    for (size_t s = 0; s < n; ++s) out.span_coefs[s] = out.group_coefs[req.group_of(s)];
  } else {
    for (size_t s = 0; s < n; ++s) out.span_coefs[s] = at(l.coefs, s);
  }
  if (!out.held)
    for (size_t s = 0; s < n; ++s) out.written |= out.span_coefs[s] != 1.0 && spans_[s].numel > 0;
  return out;
}

}  // namespace gradclip::engine
