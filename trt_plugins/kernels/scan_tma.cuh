// Token-major staging of the chunked scan's u, dt, z and mask bytes by the tensor memory accelerator (sm_90), for
// the 12-channel blocks of two warps per channel (B1 D1536). A block's channels are 12 bytes of each 1536-byte token
// row: loaded by threads, every warp load touches ~11 rows (one L1 wavefront each), and those loads cost as much as
// channel-major inputs save (NOTES.md, sessions 11 and 17). Here thread 0 asks the TMA for the chunk's rows as boxes
// of 256 rows x 32 bytes per array (starting at the 16-byte column below the block's first channel: a box's start
// must be 16-byte aligned), counted on one mbarrier per box of rows; the next chunk's boxes are asked for as soon as
// this chunk's are unpacked, so they land while it computes. The unpack turns [row][32 bytes] into the kernel's
// [channel][array][t]: a thread reads one word (4 channels) of 4 rows, transposes the 4 x 4 bytes and writes 4 words
// (4 steps of each channel). Each lane reads its 4 rows in an order rotated by its quad (rows 4 apart share a bank
// in 32-byte rows).
#pragma once
#include <cuda.h>

#include "common.cuh"
#include "mbarrier.cuh"

namespace tma {
constexpr int kBoxRows = 256, kBoxBytes = 32, kArrays = 4;  // u, dt, z, mask

// Dynamic shared memory the staging adds after the kernel's regions, for chunks of CH rows: up to 127 bytes to align
// the raw rows to 128, the rows ([array][CH][kBoxBytes]), one mbarrier per box of rows.
template <int CH>
constexpr size_t extra_smem() {
  return 128 + kArrays * CH * kBoxBytes + 8 * (CH / kBoxRows);
}

struct Maps {
  CUtensorMap map[kArrays];  // 64-byte aligned by its type
};

// Waits until the mbarrier's phase of this parity has completed (the launcher takes this path on sm_90+ only).
__device__ __forceinline__ void wait_parity(uint64_t* bar, unsigned parity) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  qm::mbar_wait(bar, parity);
#else
  __trap();
#endif
}

// Thread 0: the first use initialises bar[0 .. rows / kBoxRows); then asks for rows [row0, row0 + rows) of the present
// arrays (boxes of kBoxRows) into raw ([array][rows][kBoxBytes]), starting at byte column col (16-byte aligned), box
// h of every array counted on bar[h], box 0 first, so that the unpack of the first rows may start while the later
// ones land. Rows or columns past the tensor arrive as zeros (and count as bytes).
__device__ __forceinline__ void issue(const Maps& m, unsigned present, unsigned char* raw, uint64_t* bar, bool init,
                                      int col, int row0, int rows) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  const int boxes = rows / kBoxRows;
  if (init) {
    for (int h = 0; h < boxes; ++h) qm::mbar_init(bar + h);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  // the unpack's generic reads of raw (ordered before this by the caller's barrier) before the copies' writes
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
  const unsigned bytes = __popc(present) * kBoxRows * kBoxBytes;
  for (int h = 0; h < boxes; ++h) {
    qm::mbar_expect(bar + h, bytes);
    for (int k = 0; k < kArrays; ++k)
      if (present >> k & 1u)
        asm volatile(
            "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], "
            "[%4];" ::"r"(qm::smem_addr(raw + (k * rows + h * kBoxRows) * kBoxBytes)), "l"(&m.map[k]), "r"(col),
            "r"(row0 + h * kBoxRows), "r"(qm::smem_addr(bar + h))
            : "memory");
  }
#endif
}

// All threads, after box h of the chunk has landed: its rows of raw ([array][CH][kBoxBytes], the block's channels at
// byte off of each row) into the channels' regions of sIn (array k of channel w at sIn + w * CH_BYTES + k * CH, byte
// t = step t). Absent arrays (present bit clear) become zeros, as the thread staging writes them.
template <class C>
__device__ __forceinline__ void unpack(const unsigned char* raw, unsigned char* sIn, unsigned present, int off, int nt,
                                       int h) {
  constexpr int CH = C::CH, QUADS = kBoxRows / 4, WORDS = C::CPB / 4, ITEMS = kArrays * QUADS * WORDS;
  static_assert(C::CPB % 4 == 0, "channels in words of 4");
  for (int it = threadIdx.x; it < ITEMS; it += C::THREADS) {
    const int w = it % WORDS, q = h * QUADS + it / WORDS % QUADS, k = it / (WORDS * QUADS);
    if (4 * q >= nt) continue;  // steps past the sequence are never read
    int cols[4] = {0, 0, 0, 0};
    if (present >> k & 1u) {
      const unsigned char* src = raw + (k * CH + 4 * q) * kBoxBytes + off + 4 * w;
      int rows[4];
#pragma unroll
      for (int r = 0; r < 4; ++r) rows[r] = *reinterpret_cast<const int*>(src + ((r + q) & 3) * kBoxBytes);
      qm::transpose4x4(rows, cols);  // cols[j] byte r: row (r + q) & 3 of channel 4 w + j
#pragma unroll
      for (int j = 0; j < 4; ++j) cols[j] = static_cast<int>(__funnelshift_l(cols[j], cols[j], 8 * (q & 3)));
    }
#pragma unroll
    for (int j = 0; j < 4; ++j)
      *reinterpret_cast<int*>(sIn + (4 * w + j) * C::CH_BYTES + k * CH + 4 * q) = cols[j];
  }
}

// Host: the tensor maps of u, dt, z, mask as [B * L rows, D bytes] (absent arrays: u's map, never used); false where
// the driver's encoder is unavailable or refuses (the caller then stages by threads).
bool encode(const qm_scan_args* a, Maps* m, unsigned* present);
}  // namespace tma
