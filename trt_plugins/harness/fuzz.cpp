// Field fuzzer: feeds every creator random and malformed PluginFieldCollections (missing, unknown and duplicate
// names, wrong types, lengths 0/2/-1/huge, null data or names, NaN/Inf/negative/huge values, random bytes,
// negative nbFields) and requires createPlugin to return nullptr with a logged reason, or a plugin whose
// fields round-trip through getFieldsToSerialize. Each field's data lives in a heap buffer of exactly
// `length` elements, so a read past it is caught under AddressSanitizer / compute-sanitizer.
//   usage: qmamba_plugin_fuzz LIB [iterations] [seed]   -> prints counts, exit 0 when every case behaved
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "loader.h"

using namespace nvinfer1;

namespace {
struct Field {
  std::string name;
  bool nullName = false;
  PluginFieldType type = PluginFieldType::kFLOAT32;
  int32_t length = 1;
  std::vector<unsigned char> bytes;  // exactly length * element size (or empty: null data)
};

size_t elemSize(PluginFieldType t) {
  switch (t) {
    case PluginFieldType::kFLOAT64: return 8;
    case PluginFieldType::kFLOAT16: case PluginFieldType::kINT16: return 2;
    case PluginFieldType::kINT8: case PluginFieldType::kCHAR: return 1;
    default: return 4;
  }
}

// elements actually allocated for a field claiming `length` (a lying length gets one element)
size_t held(int32_t length) { return length >= 0 && length <= 64 ? static_cast<size_t>(length) : 1; }

template <class T>
std::vector<unsigned char> pack(T v) {
  std::vector<unsigned char> b(sizeof(T));
  std::memcpy(b.data(), &v, sizeof(T));
  return b;
}

// a plausible valid value for a field of a schema we only know by name and type
std::vector<unsigned char> validValue(std::string const& name, PluginFieldType t) {
  if (t == PluginFieldType::kINT32) {
    if (name == "kernel_size") return pack<int32_t>(4);
    if (name == "y_dtype") return pack<int32_t>(1);
    return pack<int32_t>(0);
  }
  return pack<float>(name == "eps" ? 1e-5f : 0.05f);
}
}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s LIB [iterations] [seed]\n", argv[0]);
    return 2;
  }
  qmh::PluginLibrary lib(argv[1]);
  if (!lib.error.empty()) {
    std::fprintf(stderr, "%s\n", lib.error.c_str());
    return 2;
  }
  const long iters = argc > 2 ? std::atol(argv[2]) : 20000;
  std::mt19937 rng(argc > 3 ? static_cast<unsigned>(std::atol(argv[3])) : 1234u);
  auto pick = [&](int n) { return static_cast<int>(rng() % static_cast<unsigned>(n)); };
  long created = 0, rejected = 0, silent = 0, roundTripFailures = 0, validRejected = 0;
  for (long it = 0; it < iters; ++it) {
    IPluginCreatorV3One* c = lib.creators[pick(static_cast<int>(lib.creators.size()))];
    PluginFieldCollection const* names = c->getFieldNames();
    std::vector<Field> fs;
    for (int i = 0; i < names->nbFields; ++i) {
      Field f;
      f.name = names->fields[i].name;
      f.type = names->fields[i].type;
      f.bytes = validValue(f.name, f.type);
      fs.push_back(f);
    }
    const int mutations = it % 10 == 0 ? 0 : 1 + pick(3);  // every 10th collection is left valid
    bool nullFields = false;
    int32_t nbOverride = 0;
    for (int m = 0; m < mutations && !fs.empty(); ++m) {
      Field& f = fs[pick(static_cast<int>(fs.size()))];
      switch (pick(12)) {
        case 0: fs.erase(fs.begin() + pick(static_cast<int>(fs.size()))); break;         // missing
        case 1: fs.push_back(fs[pick(static_cast<int>(fs.size()))]); break;              // duplicate
        case 2: f.name = "no_such_field_" + std::to_string(pick(100)); break;             // unknown
        case 3: f.type = f.type == PluginFieldType::kINT32 ? PluginFieldType::kFLOAT32 : PluginFieldType::kINT32;
                break;                                                                   // wrong type
        case 4: f.type = static_cast<PluginFieldType>(pick(12));
                f.bytes.resize(elemSize(f.type) * held(f.length)); break;  // other types
        case 5: f.length = pick(2) ? 0 : 2; f.bytes.resize(elemSize(f.type) * held(f.length)); break;  // wrong count
        case 6: f.length = pick(2) ? -1 : (1 << 30); f.bytes = validValue(f.name, f.type); break;  // lying length
        case 7: f.bytes.clear(); break;                                                   // null data
        case 8: f.nullName = true; break;
        case 9: {                                                                         // bad values
          const float bad[] = {NAN, INFINITY, -INFINITY, -1.f, 0.f, 1e38f, -0.f, 1e-45f};
          const int32_t badI[] = {-1, 2, 3, 9, 1 << 30, -(1 << 30), 11, 0};
          f.bytes = f.type == PluginFieldType::kINT32 ? pack(badI[pick(8)]) : pack(bad[pick(8)]);
          break;
        }
        case 10: for (auto& b : f.bytes) b = static_cast<unsigned char>(rng()); break;   // random bytes
        default: if (pick(2)) nullFields = true; else nbOverride = -1 - pick(5); break;   // broken collection
      }
    }
    // the buffer holds what (type, length) claim: a validator cannot know a buffer's size, only the claim;
    // a lying length (-1, 2^30) keeps one element so reading past it is caught
    for (auto& f : fs)
      if (!f.bytes.empty()) f.bytes.resize(elemSize(f.type) * held(f.length));
    std::vector<std::unique_ptr<unsigned char[]>> owned;
    std::vector<PluginField> pf;
    for (auto& f : fs) {
      void* data = nullptr;
      if (!f.bytes.empty()) {
        owned.emplace_back(new unsigned char[f.bytes.size()]);
        std::memcpy(owned.back().get(), f.bytes.data(), f.bytes.size());
        data = owned.back().get();
      }
      pf.emplace_back(f.nullName ? nullptr : f.name.c_str(), data, f.type, f.length);
    }
    PluginFieldCollection fc{nbOverride ? nbOverride : static_cast<int32_t>(pf.size()),
                             nullFields ? nullptr : pf.data()};
    if (nullFields && fc.nbFields == 0) fc.nbFields = 1;
    lib.finder.logger.messages.clear();
    IPluginV3* p = c->createPlugin(c->getPluginName(), &fc, TensorRTPhase::kBUILD);
    if (p == nullptr) {
      ++rejected;
      if (lib.finder.logger.messages.empty()) {
        ++silent;
        std::fprintf(stderr, "%s: rejected without a logged reason (iteration %ld)\n", c->getPluginName(), it);
      }
      if (mutations == 0) ++validRejected;
      continue;
    }
    ++created;
    auto* rt = static_cast<IPluginV3OneRuntime*>(p->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    IPluginV3* again = rt ? c->createPlugin(c->getPluginName(), rt->getFieldsToSerialize(), TensorRTPhase::kRUNTIME)
                          : nullptr;
    if (again == nullptr) ++roundTripFailures;
    delete again;
    delete p;
  }
  std::printf("iterations %ld: created %ld, rejected %ld (without a logged reason: %ld), valid collections "
              "rejected %ld, serialize round-trip failures %ld\n",
              iters, created, rejected, silent, validRejected, roundTripFailures);
  return (silent || roundTripFailures) ? 1 : 0;
}
