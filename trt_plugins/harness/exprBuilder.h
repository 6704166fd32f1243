// A minimal IExprBuilder for constant dimensions, so the harness can call getOutputShapes the way TensorRT
// does. IExprBuilder / IDimensionExpr are thin classes over apiv::VExprBuilder / apiv::VDimensionExpr
// (NvInferImpl.h); we implement those for constants and the arithmetic operations.
#pragma once
#include <NvInferRuntime.h>

#include <deque>

namespace qmh {
using namespace nvinfer1;

class ConstImpl : public apiv::VDimensionExpr {
 public:
  explicit ConstImpl(int64_t v) : mV(v) {}
  bool isConstant() const override { return true; }
  int64_t getConstantValue() const override { return mV; }
  bool isSizeTensor() const override { return false; }

 private:
  int64_t mV;
};

class ConstExpr : public IDimensionExpr {
 public:
  explicit ConstExpr(apiv::VDimensionExpr* impl) { mImpl = impl; }
};

class BuilderImpl : public apiv::VExprBuilder {
 public:
  IDimensionExpr const* constant(int64_t v) override {
    mImpls.emplace_back(v);
    mExprs.emplace_back(&mImpls.back());
    return &mExprs.back();
  }
  IDimensionExpr const* operation(DimensionOperation op, IDimensionExpr const& a, IDimensionExpr const& b) override {
    const int64_t x = a.getConstantValue(), y = b.getConstantValue();
    switch (op) {
      case DimensionOperation::kSUM: return constant(x + y);
      case DimensionOperation::kPROD: return constant(x * y);
      case DimensionOperation::kMAX: return constant(x > y ? x : y);
      case DimensionOperation::kMIN: return constant(x < y ? x : y);
      case DimensionOperation::kSUB: return constant(x - y);
      case DimensionOperation::kEQUAL: return constant(x == y);
      case DimensionOperation::kLESS: return constant(x < y);
      case DimensionOperation::kFLOOR_DIV: return y ? constant(x / y) : nullptr;
      case DimensionOperation::kCEIL_DIV: return y ? constant((x + y - 1) / y) : nullptr;
    }
    return nullptr;
  }
  IDimensionExpr const* declareSizeTensor(int32_t, IDimensionExpr const&, IDimensionExpr const&) override {
    return nullptr;
  }

 private:
  std::deque<ConstImpl> mImpls;
  std::deque<ConstExpr> mExprs;
};

class ExprBuilder : public IExprBuilder {
 public:
  ExprBuilder() { mImpl = &mBuilder; }

 private:
  BuilderImpl mBuilder;
};

}  // namespace qmh
