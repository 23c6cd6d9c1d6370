// fp16 <-> fp32 for the CPU kernels (IEEE, round to nearest even: what PyTorch's CPU conversion
// does). F16C instructions where the build has them (-march=native), c10::Half otherwise.
#pragma once

#include <c10/util/Half.h>

#include <cstdint>

#if defined(__F16C__)
#include <immintrin.h>
#endif

namespace torchrec_lowprec {

inline float h2f(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  return static_cast<float>(c10::Half(h, c10::Half::from_bits()));
#endif
}

inline uint16_t f2h(float f) {
#if defined(__F16C__)
  return static_cast<uint16_t>(_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT));
#else
  return c10::Half(f).x;
#endif
}

}  // namespace torchrec_lowprec
