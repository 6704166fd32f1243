// Plugin harness: drives one qmamba plugin through its creator the way TensorRT's builder and runtime do,
// without TensorRT's runtime. Called from trt_plugins/tests/test_plugins.py through ctypes:
//   createPlugin(kBUILD) -> capabilities -> getNbOutputs -> getOutputDataTypes -> getOutputShapes
//   -> supportsFormatCombination (every position x every type, and a non-linear format) -> configurePlugin
//   -> getWorkspaceSize -> clone -> getFieldsToSerialize -> createPlugin(kRUNTIME) -> onShapeChange
//   -> enqueue (optional; device pointers from the caller) -> outputs.
#include <cuda_runtime_api.h>

#include <memory>
#include <string>
#include <vector>

#include "exprBuilder.h"
#include "loader.h"

using namespace nvinfer1;

namespace {
constexpr DataType kTypes[] = {DataType::kFLOAT, DataType::kHALF, DataType::kINT8, DataType::kINT32,
                               DataType::kBOOL, DataType::kUINT8};
constexpr int kNbTypes = sizeof(kTypes) / sizeof(kTypes[0]);

struct Deleter {
  void operator()(IPluginV3* p) const { delete p; }
};
using PluginPtr = std::unique_ptr<IPluginV3, Deleter>;

Dims makeDims(int rank, int64_t const* d) {
  Dims r{};
  r.nbDims = rank;
  for (int i = 0; i < rank; ++i) r.d[i] = d[i];
  return r;
}

int fail(std::string const& msg, qmh::PluginLibrary const* lib, char* out, int outLen, int code) {
  std::string all = msg;
  if (lib && !lib->finder.logger.messages.empty()) all += "\nplugin log:\n" + lib->finder.logger.messages;
  if (out && outLen > 0) {
    std::strncpy(out, all.c_str(), static_cast<size_t>(outLen - 1));
    out[outLen - 1] = '\0';
  }
  return code;
}

template <class Cap>
Cap* capability(IPluginV3* p, PluginCapabilityType t) {
  return static_cast<Cap*>(p->getCapabilityInterface(t));
}
}  // namespace

extern "C" __attribute__((visibility("default"))) int qmh_run(
    char const* libPath, char const* op, int nFields, char const* const* fieldNames, int const* fieldIsInt,
    double const* fieldValues, int nIn, int const* inRanks, int64_t const* inDims /* 8 per input */,
    int const* inTypes /* nvinfer1::DataType */, void* const* inPtrs, int nOut, int* outRanks,
    int64_t* outDims /* 8 per output */, int* outTypes, uint32_t* supportedMask /* per position: bit = kTypes index */,
    int64_t* workspaceBytes, void* const* outPtrs, int doEnqueue, void* stream, char* msg, int msgLen) {
  static std::unique_ptr<qmh::PluginLibrary> lib;
  if (!lib || lib->error.size()) lib = std::make_unique<qmh::PluginLibrary>(libPath);
  if (!lib->error.empty()) return fail(lib->error, nullptr, msg, msgLen, -1);
  lib->finder.logger.messages.clear();
  IPluginCreatorV3One* creator = lib->find(op);
  if (!creator) return fail(std::string("no creator for ") + op + " (namespace qmamba, version 1)", lib.get(), msg, msgLen, -2);

  // fields exactly as the caller gives them (the ONNX parser passes the attributes named by getFieldNames)
  std::vector<float> fv(nFields);
  std::vector<int32_t> iv(nFields);
  std::vector<PluginField> fields;
  for (int i = 0; i < nFields; ++i) {
    fv[i] = static_cast<float>(fieldValues[i]);
    iv[i] = static_cast<int32_t>(fieldValues[i]);
    fields.emplace_back(fieldNames[i], fieldIsInt[i] ? static_cast<void const*>(&iv[i]) : &fv[i],
                        fieldIsInt[i] ? PluginFieldType::kINT32 : PluginFieldType::kFLOAT32, 1);
  }
  PluginFieldCollection fc{nFields, fields.data()};
  PluginPtr plugin(creator->createPlugin(op, &fc, TensorRTPhase::kBUILD));
  if (!plugin) return fail("createPlugin(kBUILD) returned nullptr", lib.get(), msg, msgLen, -3);
  auto* core = capability<IPluginV3OneCore>(plugin.get(), PluginCapabilityType::kCORE);
  auto* build = capability<IPluginV3OneBuild>(plugin.get(), PluginCapabilityType::kBUILD);
  auto* runtime = capability<IPluginV3OneRuntime>(plugin.get(), PluginCapabilityType::kRUNTIME);
  if (!core || !build || !runtime) return fail("a capability interface is missing", lib.get(), msg, msgLen, -4);
  if (std::strcmp(core->getPluginName(), op) || std::strcmp(core->getPluginNamespace(), "qmamba") ||
      std::strcmp(core->getPluginVersion(), "1"))
    return fail("core capability reports another name/namespace/version", lib.get(), msg, msgLen, -4);
  if (build->getNbOutputs() != nOut)
    return fail("getNbOutputs = " + std::to_string(build->getNbOutputs()) + ", caller expects " + std::to_string(nOut),
                lib.get(), msg, msgLen, -5);

  std::vector<DataType> inT(nIn), outT(nOut);
  for (int i = 0; i < nIn; ++i) inT[i] = static_cast<DataType>(inTypes[i]);
  if (build->getOutputDataTypes(outT.data(), nOut, inT.data(), nIn) != 0)
    return fail("getOutputDataTypes failed", lib.get(), msg, msgLen, -6);

  qmh::ExprBuilder eb;
  std::vector<DimsExprs> inE(nIn), outE(nOut);
  for (int i = 0; i < nIn; ++i) {
    inE[i].nbDims = inRanks[i];
    for (int k = 0; k < inRanks[i]; ++k) inE[i].d[k] = eb.constant(inDims[8 * i + k]);
  }
  if (build->getOutputShapes(inE.data(), nIn, nullptr, 0, outE.data(), nOut, eb) != 0)
    return fail("getOutputShapes failed", lib.get(), msg, msgLen, -7);

  std::vector<DynamicPluginTensorDesc> io(nIn + nOut);
  std::vector<PluginTensorDesc> inD(nIn), outD(nOut);
  for (int i = 0; i < nIn + nOut; ++i) {
    PluginTensorDesc& d = io[i].desc;
    if (i < nIn) {
      d.dims = makeDims(inRanks[i], inDims + 8 * i);
      d.type = inT[i];
    } else {
      const int o = i - nIn;
      d.dims.nbDims = outE[o].nbDims;
      for (int k = 0; k < outE[o].nbDims; ++k) {
        if (!outE[o].d[k] || !outE[o].d[k]->isConstant())
          return fail("output shape is not a constant expression", lib.get(), msg, msgLen, -7);
        d.dims.d[k] = outE[o].d[k]->getConstantValue();
        outDims[8 * o + k] = d.dims.d[k];
      }
      outRanks[o] = d.dims.nbDims;
      d.type = outT[o];
      outTypes[o] = static_cast<int>(outT[o]);
    }
    d.format = TensorFormat::kLINEAR;
    d.scale = 1.f;
    io[i].min = io[i].opt = io[i].max = d.dims;
    (i < nIn ? inD[i] : outD[i - nIn]) = d;
  }
  // every position x every type (earlier positions keep their actual types), then a non-linear format
  for (int pos = 0; pos < nIn + nOut; ++pos) {
    supportedMask[pos] = 0;
    const DataType actual = io[pos].desc.type;
    for (int t = 0; t < kNbTypes; ++t) {
      io[pos].desc.type = kTypes[t];
      if (build->supportsFormatCombination(pos, io.data(), nIn, nOut)) supportedMask[pos] |= 1u << t;
    }
    io[pos].desc.type = actual;
    io[pos].desc.format = TensorFormat::kCHW32;
    const bool nonLinear = build->supportsFormatCombination(pos, io.data(), nIn, nOut);
    io[pos].desc.format = TensorFormat::kLINEAR;
    if (nonLinear) return fail("a non-linear format is accepted at position " + std::to_string(pos), lib.get(), msg, msgLen, -8);
  }
  if (build->configurePlugin(io.data(), nIn, io.data() + nIn, nOut) != 0)
    return fail("configurePlugin failed", lib.get(), msg, msgLen, -9);
  *workspaceBytes = static_cast<int64_t>(build->getWorkspaceSize(io.data(), nIn, io.data() + nIn, nOut));

  PluginPtr copy(plugin->clone());
  if (!copy) return fail("clone returned nullptr", lib.get(), msg, msgLen, -10);
  plugin.reset();  // the clone must not depend on the original
  auto* copyRuntime = capability<IPluginV3OneRuntime>(copy.get(), PluginCapabilityType::kRUNTIME);
  PluginFieldCollection const* ser = copyRuntime ? copyRuntime->getFieldsToSerialize() : nullptr;
  if (!ser) return fail("getFieldsToSerialize returned nullptr", lib.get(), msg, msgLen, -11);
  PluginPtr rt(creator->createPlugin(op, ser, TensorRTPhase::kRUNTIME));
  if (!rt) return fail("createPlugin(kRUNTIME) from the serialized fields returned nullptr", lib.get(), msg, msgLen, -12);
  copy.reset();
  auto* rtRuntime = capability<IPluginV3OneRuntime>(rt.get(), PluginCapabilityType::kRUNTIME);
  if (rtRuntime->onShapeChange(inD.data(), nIn, outD.data(), nOut) != 0)
    return fail("onShapeChange failed", lib.get(), msg, msgLen, -13);
  if (!doEnqueue) return fail("", lib.get(), msg, msgLen, 0);

  void* ws = nullptr;
  if (*workspaceBytes > 0 && cudaMalloc(&ws, static_cast<size_t>(*workspaceBytes)) != cudaSuccess)
    return fail("cudaMalloc(workspace) failed", lib.get(), msg, msgLen, -14);
  const int rc = rtRuntime->enqueue(inD.data(), outD.data(), inPtrs, outPtrs, ws, static_cast<cudaStream_t>(stream));
  const cudaError_t sync = cudaStreamSynchronize(static_cast<cudaStream_t>(stream));
  if (ws) cudaFree(ws);
  if (rc != 0) return fail("enqueue returned " + std::to_string(rc), lib.get(), msg, msgLen, -15);
  if (sync != cudaSuccess)
    return fail(std::string("CUDA error after enqueue: ") + cudaGetErrorString(sync), lib.get(), msg, msgLen, -16);
  return fail("", lib.get(), msg, msgLen, 0);
}
