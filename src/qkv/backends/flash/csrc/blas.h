// Row-major GEMM helpers for the compiled flash kernel.
//
// Why not at::native::cpublas::gemm: in some PyTorch builds (this project's local
// 2.13 build among them) its float/double overloads are not exported from
// libtorch_cpu.so, so an extension that calls them fails to load. The BLAS that
// PyTorch links (MKL here, statically) does export the Fortran `sgemm_`/`dgemm_` and
// MKL's `cblas_gemm_bf16bf16f32` / `cblas_gemm_f16f16f32`, so we look those up once
// at run time with dlsym. When a symbol is missing we fall back to at::addmm_out on
// from_blob views: correct everywhere, only slower per call.
//
// Integer arguments are passed as 64-bit values (by pointer for Fortran, by value for
// CBLAS). On little-endian x86-64 an LP64 BLAS reads the low 32 bits of each, which
// hold the same small value, and an ILP64 BLAS reads all 64: the same call works with
// either integer model, so we never have to guess which one the build uses.
#pragma once

#include <ATen/ATen.h>
#include <dlfcn.h>

#include <cstdint>
#include <string>

namespace qkv_flash {

using blas_int = int64_t;

using fortran_sgemm_t = void (*)(const char*, const char*, const blas_int*, const blas_int*,
                                 const blas_int*, const float*, const float*, const blas_int*,
                                 const float*, const blas_int*, const float*, float*,
                                 const blas_int*);
using fortran_dgemm_t = void (*)(const char*, const char*, const blas_int*, const blas_int*,
                                 const blas_int*, const double*, const double*,
                                 const blas_int*, const double*, const blas_int*,
                                 const double*, double*, const blas_int*);
// MKL: cblas_gemm_bf16bf16f32 / cblas_gemm_f16f16f32 (16-bit inputs, float output).
using cblas_gemm_16_t = void (*)(blas_int layout, blas_int transa, blas_int transb, blas_int m,
                                 blas_int n, blas_int k, float alpha, const uint16_t* a,
                                 blas_int lda, const uint16_t* b, blas_int ldb, float beta,
                                 float* c, blas_int ldc);

struct BlasTable {
  fortran_sgemm_t sgemm = nullptr;
  fortran_dgemm_t dgemm = nullptr;
  cblas_gemm_16_t gemm_bf16 = nullptr;
  cblas_gemm_16_t gemm_f16 = nullptr;
};

inline const BlasTable& blas() {
  static const BlasTable table = [] {
    BlasTable t;
    // libtorch_cpu is already loaded (this extension links it); RTLD_NOLOAD only
    // returns a handle to that copy. Symbols are looked up there first so that another
    // BLAS loaded into the process (numpy's, say) is only a second choice.
    void* torch_cpu = dlopen("libtorch_cpu.so", RTLD_NOW | RTLD_NOLOAD);
    auto find = [&](const char* name) -> void* {
      void* p = torch_cpu ? dlsym(torch_cpu, name) : nullptr;
      return p ? p : dlsym(RTLD_DEFAULT, name);
    };
    t.sgemm = reinterpret_cast<fortran_sgemm_t>(find("sgemm_"));
    t.dgemm = reinterpret_cast<fortran_dgemm_t>(find("dgemm_"));
    t.gemm_bf16 = reinterpret_cast<cblas_gemm_16_t>(find("cblas_gemm_bf16bf16f32"));
    t.gemm_f16 = reinterpret_cast<cblas_gemm_16_t>(find("cblas_gemm_f16f16f32"));
    return t;
  }();
  return table;
}

inline std::string blas_description() {
  const BlasTable& t = blas();
  std::string s;
  s += t.sgemm ? "sgemm_ " : "sgemm:aten ";
  s += t.dgemm ? "dgemm_ " : "dgemm:aten ";
  s += t.gemm_bf16 ? "bf16:cblas " : "bf16:none ";
  s += t.gemm_f16 ? "f16:cblas" : "f16:none";
  return s;
}

// Fallback through ATen. Shapes: C (M, N) = alpha * op(A) op(B) + beta * C, all
// row-major with leading dimensions lda/ldb/ldc; op(A) is (M, K), op(B) is (K, N).
template <typename T, typename C_t>
void gemm_aten(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const T* A,
               int64_t lda, const T* B, int64_t ldb, float beta, C_t* C, int64_t ldc) {
  auto in_opt = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  auto out_opt = at::TensorOptions().dtype(c10::CppTypeToScalarType<C_t>::value);
  at::Tensor a = ta ? at::from_blob(const_cast<T*>(A), {K, M}, {lda, 1}, in_opt).t()
                    : at::from_blob(const_cast<T*>(A), {M, K}, {lda, 1}, in_opt);
  at::Tensor b = tb ? at::from_blob(const_cast<T*>(B), {N, K}, {ldb, 1}, in_opt).t()
                    : at::from_blob(const_cast<T*>(B), {K, N}, {ldb, 1}, in_opt);
  at::Tensor c = at::from_blob(C, {M, N}, {ldc, 1}, out_opt);
  if (a.scalar_type() != c.scalar_type()) {
    a = a.to(c.scalar_type());
    b = b.to(c.scalar_type());
  }
  // beta == 0 makes addmm ignore C's old contents (no NaN from uninitialised scratch).
  at::addmm_out(c, c, a, b, beta, alpha);
}

// C (M, N) = alpha * op(A) op(B) + beta * C, row-major. A column-major BLAS sees a
// row-major matrix as its transpose, so we ask it for C^T = op(B)^T op(A)^T.
inline void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha,
                 const float* A, int64_t lda, const float* B, int64_t ldb, float beta,
                 float* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  const BlasTable& t = blas();
  if (t.sgemm) {
    const char ca = tb ? 'T' : 'N', cb = ta ? 'T' : 'N';
    const blas_int m = N, n = M, k = K, la = ldb, lb = lda, lc = ldc;
    t.sgemm(&ca, &cb, &m, &n, &k, &alpha, B, &la, A, &lb, &beta, C, &lc);
  } else {
    gemm_aten(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  }
}

inline void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, double alpha,
                 const double* A, int64_t lda, const double* B, int64_t ldb, double beta,
                 double* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  const BlasTable& t = blas();
  if (t.dgemm) {
    const char ca = tb ? 'T' : 'N', cb = ta ? 'T' : 'N';
    const blas_int m = N, n = M, k = K, la = ldb, lb = lda, lc = ldc;
    t.dgemm(&ca, &cb, &m, &n, &k, &alpha, B, &la, A, &lb, &beta, C, &lc);
  } else {
    auto opt = at::TensorOptions().dtype(at::kDouble);
    at::Tensor a = ta ? at::from_blob(const_cast<double*>(A), {K, M}, {lda, 1}, opt).t()
                      : at::from_blob(const_cast<double*>(A), {M, K}, {lda, 1}, opt);
    at::Tensor b = tb ? at::from_blob(const_cast<double*>(B), {N, K}, {ldb, 1}, opt).t()
                      : at::from_blob(const_cast<double*>(B), {K, N}, {ldb, 1}, opt);
    at::Tensor c = at::from_blob(C, {M, N}, {ldc, 1}, opt);
    at::addmm_out(c, c, a, b, beta, alpha);
  }
}

// 16-bit inputs, float output (the CBLAS entry points take row-major directly).
template <typename T>
inline void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const T* A,
                 int64_t lda, const T* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  static_assert(std::is_same_v<T, at::BFloat16> || std::is_same_v<T, at::Half>);
  if (M == 0 || N == 0) return;
  const BlasTable& t = blas();
  cblas_gemm_16_t fn = std::is_same_v<T, at::BFloat16> ? t.gemm_bf16 : t.gemm_f16;
  if (fn) {
    constexpr blas_int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
    fn(kRowMajor, ta ? kTrans : kNoTrans, tb ? kTrans : kNoTrans, M, N, K, alpha,
       reinterpret_cast<const uint16_t*>(A), lda, reinterpret_cast<const uint16_t*>(B), ldb,
       beta, C, ldc);
  } else {
    gemm_aten(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  }
}

}  // namespace qkv_flash
