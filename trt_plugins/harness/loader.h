// Loads a plugin library the way TensorRT's registry does (dlopen, getCreators, setLoggerFinder) and keeps
// what the plugins log, for the harness and the fuzzer. Header only; needs TensorRT headers, not TensorRT.
#pragma once
#include <NvInferRuntime.h>
#include <dlfcn.h>

#include <cstring>
#include <string>
#include <vector>

namespace qmh {
using namespace nvinfer1;

class RecordingLogger : public ILogger {
 public:
  void log(Severity severity, AsciiChar const* msg) noexcept override {
    if (severity <= Severity::kWARNING) messages += std::string(msg ? msg : "(null)") + "\n";
  }
  std::string messages;
};

class Finder : public ILoggerFinder {
 public:
  ILogger* findLogger() override { return &logger; }
  RecordingLogger logger;
};

struct PluginLibrary {
  void* handle = nullptr;
  std::vector<IPluginCreatorV3One*> creators;
  Finder finder;
  std::string error;

  explicit PluginLibrary(char const* path) {
    handle = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!handle) {
      error = std::string("dlopen failed: ") + dlerror();
      return;
    }
    using GetCreators = IPluginCreatorInterface* const* (*)(int32_t&);
    using SetFinder = void (*)(ILoggerFinder*);
    auto get = reinterpret_cast<GetCreators>(dlsym(handle, "getCreators"));
    auto set = reinterpret_cast<SetFinder>(dlsym(handle, "setLoggerFinder"));
    if (!get || !set) {
      error = "the library does not export getCreators and setLoggerFinder";
      return;
    }
    set(&finder);
    int32_t n = 0;
    IPluginCreatorInterface* const* list = get(n);
    for (int32_t i = 0; i < n; ++i) {
      if (std::strcmp(list[i]->getInterfaceInfo().kind, "PLUGIN CREATOR_V3ONE") != 0) {
        error = "creator " + std::to_string(i) + " is not an IPluginCreatorV3One";
        return;
      }
      creators.push_back(static_cast<IPluginCreatorV3One*>(list[i]));
    }
  }
  IPluginCreatorV3One* find(char const* name) const {
    for (auto* c : creators)
      if (std::strcmp(c->getPluginName(), name) == 0 && std::strcmp(c->getPluginNamespace(), "qmamba") == 0 &&
          std::strcmp(c->getPluginVersion(), "1") == 0)
        return c;
    return nullptr;
  }
  // Deliberately not dlclose'd: TensorRT keeps plugin libraries loaded for the process lifetime too.
};

}  // namespace qmh
