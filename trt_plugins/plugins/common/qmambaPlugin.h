// Shared machinery of the qmamba TensorRT plugins (IPluginV3 + IPluginCreatorV3One, namespace "qmamba",
// version "1"): field schemas and their validation (the only place a PluginFieldCollection is read),
// the logger from setLoggerFinder, and a base class that implements the parts every op shares.
// Headers only from TensorRT (NvInferRuntime.h); nothing here links libnvinfer.
#pragma once

#include <NvInferRuntime.h>

#include <cstdint>
#include <exception>
#include <string>
#include <vector>

namespace qmamba {

using namespace nvinfer1;

constexpr char const* kPluginNamespace = "qmamba";
constexpr char const* kPluginVersion = "1";

// One field of an op (= one ONNX attribute). FLOAT fields are kFLOAT32, INT fields kINT32; each has length 1.
struct FieldSpec {
  char const* name;
  PluginFieldType type;
  double lo, hi;  // allowed range
  bool loOpen;    // lo excluded (scales must be > 0)
};

// Validates `fc` against `schema`: every schema field exactly once and nothing else, the declared type,
// length 1, non-null data, finite and in range. Values come out in schema order. On failure returns false
// and `why` names the plugin, the field and the problem. Reads at most `length` elements of any field.
bool parseFields(char const* plugin, std::vector<FieldSpec> const& schema, PluginFieldCollection const* fc,
                 std::vector<double>& values, std::string& why) noexcept;

// Messages go to TensorRT's logger (found through setLoggerFinder); without one they are dropped.
void setLoggerFinder(ILoggerFinder* finder) noexcept;
void log(ILogger::Severity severity, std::string const& msg) noexcept;
inline void logError(std::string const& msg) noexcept { log(ILogger::Severity::kERROR, msg); }

char const* dataTypeName(DataType t) noexcept;

// An op's static description: name, fields, and its input/output counts for a given set of field values.
struct OpInfo {
  char const* name;
  std::vector<FieldSpec> fields;
};

// Owns a PluginFieldCollection that points into its own storage (for getFieldNames/getFieldsToSerialize).
class FieldStore {
 public:
  void assign(std::vector<FieldSpec> const& schema, std::vector<double> const* values);
  PluginFieldCollection const* collection() const noexcept { return &mFc; }

 private:
  std::vector<float> mF;
  std::vector<int32_t> mI;
  std::vector<PluginField> mFields;
  PluginFieldCollection mFc{};
};

// Implements IPluginV3 with the One{Core,Build,Runtime} capabilities; an op supplies its types, shapes,
// shape checks and the kernel launch. Field values are validated before construction (OpCreator).
class PluginBase : public IPluginV3, public IPluginV3OneCore, public IPluginV3OneBuild, public IPluginV3OneRuntime {
 public:
  PluginBase(OpInfo const& info, std::vector<double> values);
  ~PluginBase() override = default;

  // IPluginV3
  IPluginCapability* getCapabilityInterface(PluginCapabilityType type) noexcept override;
  // IPluginV3OneCore
  AsciiChar const* getPluginName() const noexcept override { return mInfo.name; }
  AsciiChar const* getPluginVersion() const noexcept override { return kPluginVersion; }
  AsciiChar const* getPluginNamespace() const noexcept override { return kPluginNamespace; }
  // IPluginV3OneBuild
  int32_t getNbOutputs() const noexcept override { return nbOutputs(); }
  int32_t getOutputDataTypes(DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes,
                             int32_t nbInputs) const noexcept override;
  bool supportsFormatCombination(int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
                                 int32_t nbOutputs) noexcept override;
  int32_t configurePlugin(DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const* out,
                          int32_t nbOutputs) noexcept override;
  int32_t getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const* shapeInputs,
                          int32_t nbShapeInputs, DimsExprs* outputs, int32_t nbOutputs,
                          IExprBuilder& exprBuilder) noexcept override;
  // IPluginV3OneRuntime
  int32_t onShapeChange(PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const* out,
                        int32_t nbOutputs) noexcept override;
  IPluginV3* attachToContext(IPluginResourceContext* context) noexcept override { return clone(); }
  PluginFieldCollection const* getFieldsToSerialize() noexcept override;

  // What an op defines.
  virtual int32_t nbInputs() const noexcept = 0;
  virtual int32_t nbOutputs() const noexcept = 0;
  // The one data type allowed at a tensor position (inputs first, then outputs), given the types chosen
  // for the positions before it (HadamardQuant's X may be float32 or float16: it returns `candidate` if allowed).
  virtual bool typeAllowed(int32_t pos, DataType candidate, DynamicPluginTensorDesc const* inOut) const noexcept = 0;
  virtual DataType outputType(int32_t index, DataType const* inputTypes) const noexcept = 0;
  virtual bool outputShapes(DimsExprs const* inputs, DimsExprs* outputs, IExprBuilder& eb) const noexcept = 0;
  // Checks concrete or partially known dims (-1 = unknown) against each other and the fields.
  virtual bool checkShapes(Dims const* in, Dims const* out, std::string& why) const noexcept = 0;

 protected:
  double field(size_t i) const noexcept { return mValues[i]; }
  float fieldF(size_t i) const noexcept { return static_cast<float>(mValues[i]); }
  int32_t fieldI(size_t i) const noexcept { return static_cast<int32_t>(mValues[i]); }
  int32_t fail(std::string const& why) const noexcept;  // logs "<op>: why", returns -1
  // clone() of every op: a new plugin with the same field values (nullptr, with the reason logged, if that fails)
  template <class P>
  static IPluginV3* cloneAs(P const& self) noexcept {
    try {
      return new P(self.mValues);
    } catch (std::exception const& e) {
      static_cast<PluginBase const&>(self).fail(std::string("clone failed: ") + e.what());
    } catch (...) {
      static_cast<PluginBase const&>(self).fail("clone failed");
    }
    return nullptr;
  }

  OpInfo const& mInfo;
  std::vector<double> mValues;

 private:
  FieldStore mStore;
};

// Shape helpers for checkShapes: dims equal or unknown.
bool dimOk(int64_t got, int64_t want) noexcept;
bool rankIs(Dims const& d, int32_t rank) noexcept;
std::string dimsStr(Dims const& d);

// The creator of one op: validates the fields (schema + the op's cross-field rule), then constructs.
template <class Plugin>
class OpCreator : public IPluginCreatorV3One {
 public:
  OpCreator() { mNames.assign(Plugin::info().fields, nullptr); }
  IPluginV3* createPlugin(AsciiChar const* name, PluginFieldCollection const* fc, TensorRTPhase phase) noexcept override {
    try {
      std::vector<double> values;
      std::string why;
      if (!parseFields(Plugin::info().name, Plugin::info().fields, fc, values, why) ||
          !Plugin::checkFields(values, why)) {
        logError(why);
        return nullptr;
      }
      return new Plugin(std::move(values));
    } catch (std::exception const& e) {
      logError(std::string(Plugin::info().name) + ": " + e.what());
      return nullptr;
    }
  }
  PluginFieldCollection const* getFieldNames() noexcept override { return mNames.collection(); }
  AsciiChar const* getPluginName() const noexcept override { return Plugin::info().name; }
  AsciiChar const* getPluginVersion() const noexcept override { return kPluginVersion; }
  AsciiChar const* getPluginNamespace() const noexcept override { return kPluginNamespace; }

 private:
  FieldStore mNames;
};

// Creators of all ops, defined in plugins/registration.cpp.
IPluginCreatorInterface* const* allCreators(int32_t& count) noexcept;

}  // namespace qmamba
