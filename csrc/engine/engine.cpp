#include "engine/engine.h"

namespace gradclip::engine {

Outcome run(Backend& backend, const Request& req) {
  if (req.reduces()) backend.reduce(req);
  return backend.finish(req, nullptr);
}

}  // namespace gradclip::engine
