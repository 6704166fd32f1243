#include "qmambaPlugin.h"

#include <cmath>
#include <cstring>
#include <mutex>
#include <cstdio>

namespace qmamba {
namespace {
std::mutex gLogMutex;
ILoggerFinder* gFinder = nullptr;

char const* typeName(PluginFieldType t) noexcept {
  switch (t) {
    case PluginFieldType::kFLOAT32: return "FLOAT32";
    case PluginFieldType::kINT32: return "INT32";
    case PluginFieldType::kFLOAT16: return "FLOAT16";
    case PluginFieldType::kFLOAT64: return "FLOAT64";
    case PluginFieldType::kINT8: return "INT8";
    case PluginFieldType::kINT16: return "INT16";
    case PluginFieldType::kCHAR: return "CHAR";
    case PluginFieldType::kDIMS: return "DIMS";
    case PluginFieldType::kUNKNOWN: return "UNKNOWN";
    default: return "other";
  }
}
}  // namespace

void setLoggerFinder(ILoggerFinder* finder) noexcept {
  std::lock_guard<std::mutex> lock(gLogMutex);
  gFinder = finder;
}

void log(ILogger::Severity severity, std::string const& msg) noexcept {
  std::lock_guard<std::mutex> lock(gLogMutex);
  if (gFinder == nullptr) return;
  ILogger* logger = gFinder->findLogger();
  if (logger != nullptr) logger->log(severity, ("qmamba plugin: " + msg).c_str());
}

char const* dataTypeName(DataType t) noexcept {
  switch (t) {
    case DataType::kFLOAT: return "float32";
    case DataType::kHALF: return "float16";
    case DataType::kINT8: return "int8";
    case DataType::kUINT8: return "uint8";
    case DataType::kINT32: return "int32";
    default: return "another type";
  }
}

namespace {
// printf-style formatting into a std::string. No iostreams: the plugin runs inside other programs' processes,
// where the global locale and the libstdc++ that iostreams would use are not ours to assume.
template <class... Args>
std::string format(char const* fmt, Args... args) {
  char buf[512];
  std::snprintf(buf, sizeof(buf), fmt, args...);
  return buf;
}
}  // namespace

bool parseFields(char const* plugin, std::vector<FieldSpec> const& schema, PluginFieldCollection const* fc,
                 std::vector<double>& values, std::string& why) noexcept {
  try {
    const std::string op = std::string(plugin) + ": ";
    if (fc == nullptr) {
      why = op + "the field collection is null";
      return false;
    }
    if (fc->nbFields < 0 || (fc->nbFields > 0 && fc->fields == nullptr)) {
      why = op + format("invalid field collection (nbFields=%d, fields=%s)", fc->nbFields, fc->fields ? "set" : "null");
      return false;
    }
    values.assign(schema.size(), 0.0);
    std::vector<bool> seen(schema.size(), false);
    for (int32_t i = 0; i < fc->nbFields; ++i) {
      PluginField const& f = fc->fields[i];
      if (f.name == nullptr) {
        why = op + format("field #%d has no name", i);
        return false;
      }
      size_t k = 0;
      while (k < schema.size() && std::strcmp(schema[k].name, f.name) != 0) ++k;
      if (k == schema.size()) {
        std::string known;
        for (auto const& s : schema) known += std::string(" ") + s.name;
        why = op + "unknown field '" + f.name + "' (fields:" + known + ")";
        return false;
      }
      FieldSpec const& s = schema[k];
      const std::string name = std::string("field '") + s.name + "'";
      if (seen[k]) {
        why = op + name + " given twice";
        return false;
      }
      seen[k] = true;
      if (f.type != s.type) {
        why = op + name + " has type " + typeName(f.type) + ", expected " + typeName(s.type);
        return false;
      }
      if (f.length != 1) {
        why = op + name + format(" has length %d, expected 1", f.length);
        return false;
      }
      if (f.data == nullptr) {
        why = op + name + " has no data";
        return false;
      }
      double v = s.type == PluginFieldType::kFLOAT32 ? static_cast<double>(*static_cast<float const*>(f.data))
                                                     : static_cast<double>(*static_cast<int32_t const*>(f.data));
      if (!std::isfinite(v) || v < s.lo || v > s.hi || (s.loOpen && v == s.lo)) {
        why = op + name + format(" = %g is out of range %s%g, %g]", v, s.loOpen ? "(" : "[", s.lo, s.hi);
        return false;
      }
      values[k] = v;
    }
    for (size_t k = 0; k < schema.size(); ++k)
      if (!seen[k]) {
        why = op + "missing field '" + schema[k].name + "'";
        return false;
      }
    return true;
  } catch (std::exception const& e) {
    why = std::string(plugin) + ": " + e.what();
    return false;
  }
}

void FieldStore::assign(std::vector<FieldSpec> const& schema, std::vector<double> const* values) {
  mF.assign(schema.size(), 0.f);
  mI.assign(schema.size(), 0);
  mFields.clear();
  for (size_t k = 0; k < schema.size(); ++k) {
    const bool isFloat = schema[k].type == PluginFieldType::kFLOAT32;
    if (values != nullptr) {
      if (isFloat)
        mF[k] = static_cast<float>((*values)[k]);
      else
        mI[k] = static_cast<int32_t>((*values)[k]);
    }
    void const* data = values == nullptr ? nullptr : (isFloat ? static_cast<void const*>(&mF[k]) : &mI[k]);
    mFields.emplace_back(schema[k].name, data, schema[k].type, 1);
  }
  mFc.nbFields = static_cast<int32_t>(mFields.size());
  mFc.fields = mFields.data();
}

PluginBase::PluginBase(OpInfo const& info, std::vector<double> values) : mInfo(info), mValues(std::move(values)) {}

IPluginCapability* PluginBase::getCapabilityInterface(PluginCapabilityType type) noexcept {
  switch (type) {
    case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
    case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
    case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
    default: return nullptr;
  }
}

int32_t PluginBase::fail(std::string const& why) const noexcept {
  logError(std::string(mInfo.name) + ": " + why);
  return -1;
}

int32_t PluginBase::getOutputDataTypes(DataType* outputTypes, int32_t nbOut, DataType const* inputTypes,
                                       int32_t nbIn) const noexcept {
  if (nbIn != nbInputs() || nbOut != nbOutputs() || outputTypes == nullptr || inputTypes == nullptr)
    return fail("getOutputDataTypes: expected " + std::to_string(nbInputs()) + " inputs and " +
                std::to_string(nbOutputs()) + " outputs, got " + std::to_string(nbIn) + " and " +
                std::to_string(nbOut));
  for (int32_t i = 0; i < nbOut; ++i) outputTypes[i] = outputType(i, inputTypes);
  return 0;
}

bool PluginBase::supportsFormatCombination(int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbIn,
                                           int32_t nbOut) noexcept {
  if (inOut == nullptr || nbIn != nbInputs() || nbOut != nbOutputs() || pos < 0 || pos >= nbIn + nbOut) return false;
  return inOut[pos].desc.format == TensorFormat::kLINEAR && typeAllowed(pos, inOut[pos].desc.type, inOut);
}

int32_t PluginBase::getOutputShapes(DimsExprs const* inputs, int32_t nbIn, DimsExprs const* /*shapeInputs*/,
                                    int32_t /*nbShapeInputs*/, DimsExprs* outputs, int32_t nbOut,
                                    IExprBuilder& exprBuilder) noexcept {
  if (inputs == nullptr || outputs == nullptr || nbIn != nbInputs() || nbOut != nbOutputs())
    return fail("getOutputShapes: expected " + std::to_string(nbInputs()) + " inputs and " +
                std::to_string(nbOutputs()) + " outputs");
  return outputShapes(inputs, outputs, exprBuilder) ? 0 : fail("getOutputShapes: inputs of the wrong rank");
}

int32_t PluginBase::configurePlugin(DynamicPluginTensorDesc const* in, int32_t nbIn, DynamicPluginTensorDesc const* out,
                                    int32_t nbOut) noexcept {
  if (in == nullptr || out == nullptr || nbIn != nbInputs() || nbOut != nbOutputs())
    return fail("configurePlugin: wrong number of tensors");
  std::vector<Dims> di(nbIn), dout(nbOut);
  for (int32_t i = 0; i < nbIn; ++i) di[i] = in[i].desc.dims;
  for (int32_t i = 0; i < nbOut; ++i) dout[i] = out[i].desc.dims;
  std::string why;
  return checkShapes(di.data(), dout.data(), why) ? 0 : fail("configurePlugin: " + why);
}

int32_t PluginBase::onShapeChange(PluginTensorDesc const* in, int32_t nbIn, PluginTensorDesc const* out,
                                  int32_t nbOut) noexcept {
  if (in == nullptr || out == nullptr || nbIn != nbInputs() || nbOut != nbOutputs())
    return fail("onShapeChange: wrong number of tensors");
  std::vector<Dims> di(nbIn), dout(nbOut);
  for (int32_t i = 0; i < nbIn; ++i) di[i] = in[i].dims;
  for (int32_t i = 0; i < nbOut; ++i) dout[i] = out[i].dims;
  std::string why;
  return checkShapes(di.data(), dout.data(), why) ? 0 : fail("onShapeChange: " + why);
}

PluginFieldCollection const* PluginBase::getFieldsToSerialize() noexcept {
  try {
    mStore.assign(mInfo.fields, &mValues);
    return mStore.collection();
  } catch (std::exception const& e) {
    fail(std::string("getFieldsToSerialize: ") + e.what());
    return nullptr;
  }
}

bool dimOk(int64_t got, int64_t want) noexcept { return got == -1 || want == -1 || got == want; }
bool rankIs(Dims const& d, int32_t rank) noexcept { return d.nbDims == rank; }

std::string dimsStr(Dims const& d) {
  std::string s = "[";
  for (int32_t i = 0; i < d.nbDims && i < Dims::MAX_DIMS; ++i) s += (i ? ", " : "") + std::to_string(d.d[i]);
  return s + "]";
}

}  // namespace qmamba
