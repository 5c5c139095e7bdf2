// Linked into every TVM phase library (twophase/compiler/lower_tvm.py); used by twophase/runtime/backend_tvm.py.
//
// twophase_step_replay runs the kernel calls that one Relax VM run of a decode step made, in order, with the
// same arguments: a decode step over the bound cache is the same calls on the same tensors every token (the
// context length is data, not a shape), so once recorded it needs neither the VM's bytecode nor its builtins
// (argument checks, shape matching, tensor allocation: about 1,250 calls per SmolLM2 step).
//
//   n        number of kernel calls
//   funcs    n TVM-FFI function handles (the kernels, as the VM called them)
//   offsets  n + 1 offsets into args: call i takes args[offsets[i] .. offsets[i + 1])
//   args     the arguments, as TVM-FFI AnyViews (borrowed: the caller keeps the tensors alive)
//
// Returns 0, or 1 + the index of the call that failed (its error is left raised, for the caller to fetch).
#include <cstdint>

extern "C" {

struct TwophaseAny {  // TVMFFIAny (tvm/ffi/c_api.h): type index, padding, 8-byte payload
  int32_t type_index;
  uint32_t zero_padding;
  int64_t v;
};

int TVMFFIFunctionCall(void* func, TwophaseAny* args, int32_t num_args, TwophaseAny* result);
int TVMFFIObjectDecRef(void* obj);

int twophase_step_replay(int32_t n, void* const* funcs, const int32_t* offsets, TwophaseAny* args) {
  const int32_t kStaticObjectBegin = 64;  // kTVMFFIStaticObjectBegin: type indices from here are objects
  for (int32_t i = 0; i < n; ++i) {
    TwophaseAny result = {0, 0, 0};
    if (TVMFFIFunctionCall(funcs[i], args + offsets[i], offsets[i + 1] - offsets[i], &result) != 0) return i + 1;
    if (result.type_index >= kStaticObjectBegin) TVMFFIObjectDecRef(reinterpret_cast<void*>(result.v));
  }
  return 0;
}

}  // extern "C"
