// Software prefetch of the rows the CPU kernels read at random (the lookup's rows, the update's
// rows and optimizer state), in one place so both kernels fetch the same lines.
#pragma once

#include <cstdint>

namespace torchrec_lowprec {

// Every 64-byte cache line that [p, p + bytes) touches, for reading, into all cache levels (hot
// rows of skewed ids are read again soon). Rows straddle lines: a 132-byte int8 row at dim 128
// spans three or four, and prefetching only its first and last byte left the middle ones to
// demand misses (the lookup was up to 1.4x slower on an AVX2 EPYC). Forced inline: GCC drops a
// call to an out-of-line function whose only effect is a prefetch.
__attribute__((always_inline)) inline void prefetch_lines(const void* p, int64_t bytes) {
#if defined(__GNUC__)
  const uintptr_t first = reinterpret_cast<uintptr_t>(p) & ~uintptr_t{63};
  const uintptr_t last = reinterpret_cast<uintptr_t>(p) + static_cast<uintptr_t>(bytes) - 1;
  for (uintptr_t line = first; line <= last; line += 64) {
    __builtin_prefetch(reinterpret_cast<const void*>(line), 0, 3);
  }
#endif
}

}  // namespace torchrec_lowprec
