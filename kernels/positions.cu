// positions_from_offsets on the device: token t of request b sits at position
// offsets[b] + (t - indptr[b]). One thread per token, no host round trip. Tokens that no
// request owns (t >= indptr[batch_size]) get -1. Rendered after common.cuh and a prelude
// that defines index_t and the PositionsParams struct.

extern "C" __global__ void positions_kernel(const PositionsParams p) {
  const i64 t = (i64)blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= p.num_tokens) return;
  const index_t* indptr = (const index_t*)p.indptr;
  const int b = find_request<index_t>(indptr, (int)p.batch_size, t);
  ((index_t*)p.out)[t] =
      b >= 0 ? (index_t)((i64)((const index_t*)p.offsets)[b] + (t - (i64)indptr[b])) : (index_t)-1;
}
