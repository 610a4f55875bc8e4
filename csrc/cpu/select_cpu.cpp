// CPU implementation of fused_imbalance::cpp_select_kth(values, k, first_hist): the k-th smallest
// valid value of a vector, exactly (fused_imbalance/ops/select.py states the contract; the
// Triton op of fused_imbalance/ops/triton_select.py computes the same thing on the GPU).
//
// values (N,) float32 or float64, contiguous. An entry < 0 is invalid; every other entry (±0,
// positive, +inf, NaN) is valid. k, one integer, is clamped to [0, n_valid - 1]; the result is
// the value that torch.sort puts at position k of the valid entries (NaN last, -0.0 given as
// +0.0), 0.0 when no entry is valid.
//
// A radix select over the keys: the bit pattern of a valid value with the sign cleared (31 or
// 63 bits), which orders like the value. The digits are those of the Triton op (at most 8 bits:
// 8/8/8/7 for float32, seven of 8 and one of 7 for float64; the first is the exponent), so that
// `first_hist` means the same on both. The first pass reads the values once, in parallel chunks,
// each into its own histogram of the first digit (or takes `first_hist`); the bin holding the
// k-th key is found from the summed histogram, and only the keys of that bin are copied out,
// each chunk to its own offset. The later digits narrow that copy the same way (in parallel
// while it is large), and once it fits one chunk std::nth_element finishes on it.
//
// Why not std::nth_element on a copy of all valid values: that copies n_valid values and
// partitions them on one thread (introselect: O(N) on average, several passes of data movement,
// O(N log N) at worst); the radix pass is one parallel read with no copy, and it copies one
// binade. Label probabilities crowd into [0.5, 1), so when the k-th lies there the copy is most
// of N and the later passes are parallel passes over it; when it lies below, the copy is small.
// Both are exact. Every count is an integer, and chunks depend only on N, so the result is
// deterministic (and does not depend on the thread count).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

namespace fused_imbalance {
namespace cpu {
namespace {

using at::Tensor;

constexpr int kRadixBits = 8;         // widest digit, as the Triton op's (triton_select.RADIX_BITS)
constexpr int64_t kChunk = 1 << 16;   // entries per chunk of a parallel pass (thread hand-off negligible)
constexpr int64_t kMaxChunks = 64;    // at most this many per-chunk histograms

// (shift, width) of each digit, most significant first: the key's bits in passes of at most
// kRadixBits, the wider digits first (triton_select.digit_plan).
std::vector<std::pair<int, int>> digit_plan(int key_bits) {
  const int passes = (key_bits + kRadixBits - 1) / kRadixBits;
  const int base = key_bits / passes, extra = key_bits % passes;
  std::vector<std::pair<int, int>> plan;
  int top = key_bits;
  for (int j = 0; j < passes; ++j) {
    const int width = base + (j < extra ? 1 : 0);
    top -= width;
    plan.emplace_back(top, width);
  }
  return plan;
}

// Chunks of [0, n) that depend only on n.
struct Chunks {
  int64_t size, count;
  explicit Chunks(int64_t n) {
    count = std::max<int64_t>(1, std::min<int64_t>(kMaxChunks, (n + kChunk - 1) / kChunk));
    size = std::max<int64_t>(1, (n + count - 1) / count);
  }
  int64_t begin(int64_t c, int64_t n) const { return std::min(n, c * size); }
  int64_t end(int64_t c, int64_t n) const { return std::min(n, (c + 1) * size); }
};

// (valid, key) of a value.
template <typename F, typename K>
inline bool key_of(F v, K& key) {
  K bits;
  std::memcpy(&bits, &v, sizeof(F));
  key = bits & (~K(0) >> 1);
  return !(v < F(0));
}

// Per-chunk histograms (chunk-major, `bins` each) of the digit (key >> shift) & (bins - 1) over
// entries i of [0, n) for which get(i, key) is true.
template <typename K, typename Get>
std::vector<int64_t> chunk_histograms(int64_t n, const Chunks& ch, int shift, int64_t bins, Get get) {
  std::vector<int64_t> h(ch.count * bins, 0);
  at::parallel_for(0, ch.count, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t* hc = h.data() + c * bins;
      for (int64_t i = ch.begin(c, n), e = ch.end(c, n); i < e; ++i) {
        K key;
        if (get(i, key)) ++hc[(key >> shift) & K(bins - 1)];
      }
    }
  });
  return h;
}

// The keys of entries whose get() is true and whose key >> shift equals `hi`, in index order;
// `counts[c]` of them in chunk c (each chunk writes at its own offset).
template <typename K, typename Get>
std::vector<K> gather(int64_t n, const Chunks& ch, const std::vector<int64_t>& counts, int shift, K hi, Get get) {
  std::vector<int64_t> offset(ch.count + 1, 0);
  for (int64_t c = 0; c < ch.count; ++c) offset[c + 1] = offset[c] + counts[c];
  std::vector<K> out(offset[ch.count]);
  at::parallel_for(0, ch.count, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      K* o = out.data() + offset[c];
      const K* stop = out.data() + offset[c + 1];  // a first_hist not of these values cannot overrun
      for (int64_t i = ch.begin(c, n), e = ch.end(c, n); i < e && o < stop; ++i) {
        K key;
        if (get(i, key) && (key >> shift) == hi) *o++ = key;
      }
    }
  });
  return out;
}

// The bin of `hist` that holds the rank-th key, and the rank within it.
std::pair<int64_t, int64_t> descend(const int64_t* hist, int64_t bins, int64_t rank) {
  int64_t below = 0;
  for (int64_t b = 0; b < bins; ++b) {
    if (below + hist[b] > rank) return {b, rank - below};
    below += hist[b];
  }
  return {bins - 1, 0};  // no rank-th key: only with a first_hist not of these values
}

template <typename F>
F select_kth(const F* v, int64_t n, int64_t k, const int64_t* first_hist) {
  using K = std::conditional_t<sizeof(F) == 8, uint64_t, uint32_t>;
  const auto plan = digit_plan(static_cast<int>(sizeof(F)) * 8 - 1);
  auto from_values = [v](int64_t i, K& key) { return key_of<F, K>(v[i], key); };

  // The first digit, over the values.
  const int shift0 = plan[0].first;
  const int64_t bins0 = int64_t(1) << plan[0].second;
  const Chunks ch(n);
  std::vector<int64_t> per_chunk, hist(bins0, 0);
  if (first_hist != nullptr) {
    std::copy(first_hist, first_hist + bins0, hist.begin());
  } else {
    per_chunk = chunk_histograms<K>(n, ch, shift0, bins0, from_values);
    for (int64_t c = 0; c < ch.count; ++c)
      for (int64_t b = 0; b < bins0; ++b) hist[b] += per_chunk[c * bins0 + b];
  }
  int64_t n_valid = 0;
  for (int64_t b = 0; b < bins0; ++b) n_valid += hist[b];
  if (n_valid <= 0) return F(0);
  auto [digit, rank] = descend(hist.data(), bins0, std::min(std::max<int64_t>(k, 0), n_valid - 1));
  K prefix = static_cast<K>(digit);

  // The keys of that bin, each chunk's count from its histogram (or counted now).
  std::vector<int64_t> counts(ch.count);
  if (first_hist == nullptr) {
    for (int64_t c = 0; c < ch.count; ++c) counts[c] = per_chunk[c * bins0 + digit];
  } else {
    at::parallel_for(0, ch.count, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        int64_t m = 0;
        for (int64_t i = ch.begin(c, n), e = ch.end(c, n); i < e; ++i) {
          K key;
          m += from_values(i, key) && (key >> shift0) == prefix;
        }
        counts[c] = m;
      }
    });
  }
  std::vector<K> keys = gather<K>(n, ch, counts, shift0, prefix, from_values);

  // The later digits narrow the copy; nth_element once it fits one chunk.
  for (size_t j = 1; j < plan.size(); ++j) {
    const int64_t m = static_cast<int64_t>(keys.size());
    if (m == 0) return F(0);  // only with a first_hist not of these values
    rank = std::min(rank, m - 1);
    if (m <= kChunk) {
      std::nth_element(keys.begin(), keys.begin() + rank, keys.end());
      prefix = keys[rank];
      break;
    }
    const auto [shift, width] = plan[j];
    const int64_t bins = int64_t(1) << width;
    const Chunks cj(m);
    auto from_keys = [&keys](int64_t i, K& key) {
      key = keys[i];
      return true;
    };
    std::vector<int64_t> pc = chunk_histograms<K>(m, cj, shift, bins, from_keys);
    std::vector<int64_t> h(bins, 0);
    for (int64_t c = 0; c < cj.count; ++c)
      for (int64_t b = 0; b < bins; ++b) h[b] += pc[c * bins + b];
    std::tie(digit, rank) = descend(h.data(), bins, rank);
    prefix = (prefix << width) | static_cast<K>(digit);
    if (j + 1 == plan.size()) break;  // the prefix is the whole key
    std::vector<int64_t> cc(cj.count);
    for (int64_t c = 0; c < cj.count; ++c) cc[c] = pc[c * bins + digit];
    keys = gather<K>(m, cj, cc, shift, prefix, from_keys);
  }
  F out;
  std::memcpy(&out, &prefix, sizeof(F));
  return out;
}

Tensor cpp_select_kth_cpu(const Tensor& values, const Tensor& k, const std::optional<Tensor>& first_hist) {
  TORCH_CHECK(values.scalar_type() == at::kFloat || values.scalar_type() == at::kDouble,
              "fused_imbalance: select_kth values must be float32 or float64, got ", values.scalar_type());
  TORCH_CHECK(k.numel() == 1 && !at::isFloatingType(k.scalar_type()) && k.scalar_type() != at::kBool,
              "fused_imbalance: select_kth k must be one integer");
  TORCH_CHECK(k.device().is_cpu(), "fused_imbalance: select_kth k must be on the CPU with the values");
  const Tensor v = values.contiguous();
  const int64_t* fh = nullptr;
  Tensor hist;
  if (first_hist.has_value() && first_hist->defined()) {
    TORCH_CHECK(first_hist->scalar_type() == at::kLong && first_hist->numel() == (int64_t(1) << kRadixBits) &&
                    first_hist->device().is_cpu(),
                "fused_imbalance: select_kth first_hist must be int64 with ", int64_t(1) << kRadixBits,
                " bins, on the CPU");
    hist = first_hist->contiguous();
    fh = hist.data_ptr<int64_t>();
  }
  const int64_t kk = k.item<int64_t>();  // a CPU tensor: no device to wait for
  Tensor out = at::empty({}, v.options());
  if (v.scalar_type() == at::kDouble) {
    out.fill_(select_kth<double>(v.data_ptr<double>(), v.numel(), kk, fh));
  } else {
    out.fill_(select_kth<float>(v.data_ptr<float>(), v.numel(), kk, fh));
  }
  return out;
}

}  // namespace

// The k-th smallest valid entry of contiguous float32 or float64 `values` on the CPU (the op's contract,
// k as an int), for the OHEM cross-entropy op (ohem_cpu.cpp), which selects within its own call.
double select_kth_value(const Tensor& values, int64_t k) {
  if (values.scalar_type() == at::kDouble)
    return select_kth<double>(values.data_ptr<double>(), values.numel(), k, nullptr);
  return select_kth<float>(values.data_ptr<float>(), values.numel(), k, nullptr);
}

TORCH_LIBRARY_IMPL(fused_imbalance, CPU, m) {
  m.impl("cpp_select_kth", &cpp_select_kth_cpu);
}

}  // namespace cpu
}  // namespace fused_imbalance
