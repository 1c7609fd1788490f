// LowBitLinear: a TensorRT IPluginV3 (TensorRT >= 10.0, so JetPack 6's TRT 10.3) over the esr_lowbit
// C API. It replaces one 2DQuant quantized linear: activation fake-quant + weight dequant + MatMul +
// bias, with packed 2..8-bit weights and an integer GEMM (maths in runtime/kernels/esr_lowbit.h).
//
// ONNX node (written by calibrate/export_plugin.py), found by the ONNX parser's fallback importer:
//   op_type "LowBitLinear", domain "edge_sr", attributes plugin_version="1",
//   plugin_namespace="edge_sr", and the plugin fields below.
//   inputs : x [..., K] float32|float16, packed [N, words] int32 (esr_pack_weights layout),
//            bias [N] float32 (only if has_bias)
//   output : y [..., N], same type as x
// Fields (all are also what the engine serializes): act_bits, w_bits, in_features (K),
// out_features (N), act_groups (G), has_bias (int32); act_lower, act_upper (float32[G]);
// w_lower, w_scale (float32[N]).
//
// Checked: tests/test_plugin_compile.py compiles this file to an object file against the public
// headers of TensorRT 10.3.0 (the version JetPack 6.1/6.2 ships; IPluginV3 and friends are in
// NvInferRuntime.h there) and the CUDA headers, with -Wall -Wextra -Werror and -Werror=
// overloaded-virtual / suggest-override, so a virtual whose signature differs from TensorRT's fails.
// Not checked there: linking (no libnvinfer) and running (needs TensorRT and a GPU). The two
// extern "C" entry points at the end are not declared in the TensorRT headers; their signatures
// follow NVIDIA's plugin library interface (IPluginRegistry::loadLibrary, trtexec --dynamicPlugins).
#include "esr_lowbit.h"

#include <NvInfer.h>
#include <NvInferRuntime.h>
#include <cuda_runtime_api.h>

#include <cstdio>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

using namespace nvinfer1;

namespace
{
constexpr char const* kPLUGIN_NAME = "LowBitLinear";
constexpr char const* kPLUGIN_VERSION = "1";
constexpr char const* kPLUGIN_NAMESPACE = "edge_sr";

std::mutex gLoggerMutex;
ILoggerFinder* gLoggerFinder = nullptr;

void logError(std::string const& msg) noexcept
{
    std::lock_guard<std::mutex> lock(gLoggerMutex);
    ILogger* logger = gLoggerFinder != nullptr ? gLoggerFinder->findLogger() : nullptr;
    std::string const text = std::string("[LowBitLinear] ") + msg;
    if (logger != nullptr)
        logger->log(ILogger::Severity::kERROR, text.c_str());
    else
        std::fprintf(stderr, "%s\n", text.c_str());
}

struct LowBitParams
{
    int32_t actBits{8};
    int32_t wBits{8};
    int32_t inFeatures{0};
    int32_t outFeatures{0};
    int32_t actGroups{1};
    int32_t hasBias{0};
    std::vector<float> actLower;
    std::vector<float> actUpper;
    std::vector<float> wLower;
    std::vector<float> wScale;

    // Returns an empty string when valid, else why not.
    std::string validate() const
    {
        if (actBits < 2 || actBits > 8 || wBits < 2 || wBits > 8)
            return "act_bits and w_bits must be in 2..8";
        if (inFeatures <= 0 || inFeatures > 32768 || outFeatures <= 0)
            return "in_features must be in 1..32768 and out_features positive";
        if (actGroups < 1 || outFeatures % actGroups != 0)
            return "out_features must be divisible by act_groups";
        if (static_cast<int32_t>(actLower.size()) != actGroups
            || static_cast<int32_t>(actUpper.size()) != actGroups)
            return "act_lower/act_upper must have act_groups values";
        if (static_cast<int32_t>(wLower.size()) != outFeatures
            || static_cast<int32_t>(wScale.size()) != outFeatures)
            return "w_lower/w_scale must have out_features values";
        for (int32_t g = 0; g < actGroups; ++g)
            if (!(actUpper[g] > actLower[g]))
                return "act_upper must exceed act_lower";
        return {};
    }
};

class LowBitLinearPlugin final : public IPluginV3,
                                 public IPluginV3OneCore,
                                 public IPluginV3OneBuild,
                                 public IPluginV3OneRuntime
{
public:
    explicit LowBitLinearPlugin(LowBitParams params)
        : mParams(std::move(params))
    {
        initFieldsToSerialize();
    }

    LowBitLinearPlugin(LowBitLinearPlugin const& other)
        : mParams(other.mParams)
    {
        // Device buffers are per instance: a clone uploads its own copy on first enqueue.
        initFieldsToSerialize();
    }

    LowBitLinearPlugin& operator=(LowBitLinearPlugin const&) = delete;

    ~LowBitLinearPlugin() override
    {
        if (mDevParams != nullptr)
            cudaFree(mDevParams);
    }

    // ---- IPluginV3 ----
    IPluginCapability* getCapabilityInterface(PluginCapabilityType type) noexcept override
    {
        switch (type)
        {
        case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
        case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
        case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
        }
        return nullptr;
    }

    IPluginV3* clone() noexcept override
    {
        try
        {
            return new LowBitLinearPlugin(*this);
        }
        catch (std::exception const& e)
        {
            logError(e.what());
        }
        return nullptr;
    }

    // ---- IPluginV3OneCore ----
    char const* getPluginName() const noexcept override { return kPLUGIN_NAME; }
    char const* getPluginVersion() const noexcept override { return kPLUGIN_VERSION; }
    char const* getPluginNamespace() const noexcept override { return kPLUGIN_NAMESPACE; }

    // ---- IPluginV3OneBuild ----
    int32_t getNbOutputs() const noexcept override { return 1; }

    int32_t configurePlugin(DynamicPluginTensorDesc const* in, int32_t nbInputs,
        DynamicPluginTensorDesc const* /*out*/, int32_t nbOutputs) noexcept override
    {
        if (nbInputs != expectedInputs() || nbOutputs != 1)
        {
            logError("wrong number of inputs/outputs");
            return -1;
        }
        Dims const& x = in[0].desc.dims;
        if (x.nbDims < 1 || (x.d[x.nbDims - 1] != -1 && x.d[x.nbDims - 1] != mParams.inFeatures))
        {
            logError("the last dimension of x must equal in_features");
            return -1;
        }
        return 0;
    }

    int32_t getOutputDataTypes(DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes,
        int32_t nbInputs) const noexcept override
    {
        if (nbOutputs != 1 || nbInputs < 1)
            return -1;
        outputTypes[0] = inputTypes[0]; // FP16 in -> FP16 out (the deployed path), FP32 -> FP32
        return 0;
    }

    int32_t getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const* /*shapeInputs*/,
        int32_t /*nbShapeInputs*/, DimsExprs* outputs, int32_t nbOutputs, IExprBuilder& exprBuilder) noexcept override
    {
        if (nbInputs != expectedInputs() || nbOutputs != 1 || inputs[0].nbDims < 1)
            return -1;
        outputs[0] = inputs[0];
        outputs[0].d[inputs[0].nbDims - 1] = exprBuilder.constant(mParams.outFeatures);
        return 0;
    }

    bool supportsFormatCombination(
        int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t /*nbOutputs*/) noexcept override
    {
        PluginTensorDesc const& d = inOut[pos].desc;
        if (d.format != TensorFormat::kLINEAR)
            return false;
        if (pos == 0)
            return d.type == DataType::kFLOAT || d.type == DataType::kHALF;
        if (pos == 1)
            return d.type == DataType::kINT32; // packed weight words
        if (pos == 2 && mParams.hasBias != 0 && pos < nbInputs)
            return d.type == DataType::kFLOAT; // bias
        return pos == nbInputs && d.type == inOut[0].desc.type; // output
    }

    size_t getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t /*nbInputs*/,
        DynamicPluginTensorDesc const* /*outputs*/, int32_t /*nbOutputs*/) const noexcept override
    {
        return esr_lowbit_workspace_size(rows(inputs[0].max), mParams.inFeatures, mParams.actGroups);
    }

    // ---- IPluginV3OneRuntime ----
    int32_t onShapeChange(PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const* /*out*/,
        int32_t nbOutputs) noexcept override
    {
        if (nbInputs != expectedInputs() || nbOutputs != 1)
            return -1;
        Dims const& x = in[0].dims;
        return x.d[x.nbDims - 1] == mParams.inFeatures ? 0 : -1;
    }

    IPluginV3* attachToContext(IPluginResourceContext* /*context*/) noexcept override { return clone(); }

    PluginFieldCollection const* getFieldsToSerialize() noexcept override { return &mFC; }

    int32_t enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* outputDesc,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override
    {
        try
        {
            if (uploadParams(stream) != 0)
                return -1;
            int64_t const M = rows(inputDesc[0].dims);
            if (M == 0)
                return 0;
            int const xType = inputDesc[0].type == DataType::kHALF ? ESR_F16 : ESR_F32;
            int const outType = outputDesc[0].type == DataType::kHALF ? ESR_F16 : ESR_F32;
            int32_t const G = mParams.actGroups;
            int32_t const N = mParams.outFeatures;
            float const* actLower = mDevParams;
            float const* actUpper = mDevParams + G;
            float const* wLower = mDevParams + 2 * G;
            float const* wScale = mDevParams + 2 * G + N;
            float const* bias = mParams.hasBias != 0 ? static_cast<float const*>(inputs[2]) : nullptr;
            int const status = esr_lowbit_linear_fused(inputs[0], xType, M, mParams.inFeatures, N, G,
                actLower, actUpper, mParams.actBits, static_cast<uint32_t const*>(inputs[1]), mParams.wBits,
                wLower, wScale, bias, outputs[0], outType, workspace, stream);
            if (status != ESR_OK)
            {
                logError(std::string("esr_lowbit_linear_fused: ") + esr_status_string(status) + " "
                    + esr_last_cuda_error());
                return -1;
            }
            return 0;
        }
        catch (std::exception const& e)
        {
            logError(e.what());
        }
        return -1;
    }

private:
    int32_t expectedInputs() const { return mParams.hasBias != 0 ? 3 : 2; }

    static int64_t rows(Dims const& d)
    {
        int64_t m = 1;
        for (int32_t i = 0; i + 1 < d.nbDims; ++i)
            m *= d.d[i] < 0 ? 0 : d.d[i];
        return m;
    }

    // Copies the grids to the device once per instance (TensorRT owns one instance per context).
    int32_t uploadParams(cudaStream_t stream)
    {
        if (mDevParams != nullptr)
            return 0;
        int32_t const G = mParams.actGroups;
        int32_t const N = mParams.outFeatures;
        mHostParams.clear();
        mHostParams.insert(mHostParams.end(), mParams.actLower.begin(), mParams.actLower.end());
        mHostParams.insert(mHostParams.end(), mParams.actUpper.begin(), mParams.actUpper.end());
        mHostParams.insert(mHostParams.end(), mParams.wLower.begin(), mParams.wLower.end());
        mHostParams.insert(mHostParams.end(), mParams.wScale.begin(), mParams.wScale.end());
        size_t const bytes = sizeof(float) * static_cast<size_t>(2 * G + 2 * N);
        if (cudaMalloc(reinterpret_cast<void**>(&mDevParams), bytes) != cudaSuccess)
        {
            mDevParams = nullptr;
            logError("cudaMalloc of the grid parameters failed");
            return -1;
        }
        if (cudaMemcpyAsync(mDevParams, mHostParams.data(), bytes, cudaMemcpyHostToDevice, stream) != cudaSuccess)
        {
            logError("cudaMemcpyAsync of the grid parameters failed");
            return -1;
        }
        // The host vector must outlive the copy: it is a member, and the stream orders the kernels.
        return 0;
    }

    void initFieldsToSerialize()
    {
        mFields.clear();
        mFields.emplace_back("act_bits", &mParams.actBits, PluginFieldType::kINT32, 1);
        mFields.emplace_back("w_bits", &mParams.wBits, PluginFieldType::kINT32, 1);
        mFields.emplace_back("in_features", &mParams.inFeatures, PluginFieldType::kINT32, 1);
        mFields.emplace_back("out_features", &mParams.outFeatures, PluginFieldType::kINT32, 1);
        mFields.emplace_back("act_groups", &mParams.actGroups, PluginFieldType::kINT32, 1);
        mFields.emplace_back("has_bias", &mParams.hasBias, PluginFieldType::kINT32, 1);
        mFields.emplace_back("act_lower", mParams.actLower.data(), PluginFieldType::kFLOAT32,
            static_cast<int32_t>(mParams.actLower.size()));
        mFields.emplace_back("act_upper", mParams.actUpper.data(), PluginFieldType::kFLOAT32,
            static_cast<int32_t>(mParams.actUpper.size()));
        mFields.emplace_back("w_lower", mParams.wLower.data(), PluginFieldType::kFLOAT32,
            static_cast<int32_t>(mParams.wLower.size()));
        mFields.emplace_back("w_scale", mParams.wScale.data(), PluginFieldType::kFLOAT32,
            static_cast<int32_t>(mParams.wScale.size()));
        mFC.nbFields = static_cast<int32_t>(mFields.size());
        mFC.fields = mFields.data();
    }

    LowBitParams mParams;
    std::vector<float> mHostParams;
    float* mDevParams{nullptr};
    std::vector<PluginField> mFields;
    PluginFieldCollection mFC{};
};

class LowBitLinearPluginCreator final : public IPluginCreatorV3One
{
public:
    LowBitLinearPluginCreator()
    {
        mFieldNames.emplace_back("act_bits", nullptr, PluginFieldType::kINT32, 1);
        mFieldNames.emplace_back("w_bits", nullptr, PluginFieldType::kINT32, 1);
        mFieldNames.emplace_back("in_features", nullptr, PluginFieldType::kINT32, 1);
        mFieldNames.emplace_back("out_features", nullptr, PluginFieldType::kINT32, 1);
        mFieldNames.emplace_back("act_groups", nullptr, PluginFieldType::kINT32, 1);
        mFieldNames.emplace_back("has_bias", nullptr, PluginFieldType::kINT32, 1);
        mFieldNames.emplace_back("act_lower", nullptr, PluginFieldType::kFLOAT32, 0);
        mFieldNames.emplace_back("act_upper", nullptr, PluginFieldType::kFLOAT32, 0);
        mFieldNames.emplace_back("w_lower", nullptr, PluginFieldType::kFLOAT32, 0);
        mFieldNames.emplace_back("w_scale", nullptr, PluginFieldType::kFLOAT32, 0);
        mFC.nbFields = static_cast<int32_t>(mFieldNames.size());
        mFC.fields = mFieldNames.data();
    }

    char const* getPluginName() const noexcept override { return kPLUGIN_NAME; }
    char const* getPluginVersion() const noexcept override { return kPLUGIN_VERSION; }
    char const* getPluginNamespace() const noexcept override { return kPLUGIN_NAMESPACE; }
    PluginFieldCollection const* getFieldNames() noexcept override { return &mFC; }

    IPluginV3* createPlugin(char const* name, PluginFieldCollection const* fc, TensorRTPhase /*phase*/) noexcept override
    {
        try
        {
            LowBitParams p;
            for (int32_t i = 0; fc != nullptr && i < fc->nbFields; ++i)
            {
                PluginField const& f = fc->fields[i];
                if (f.data == nullptr)
                    continue;
                if (f.type == PluginFieldType::kINT32 && f.length >= 1)
                {
                    int32_t const v = *static_cast<int32_t const*>(f.data);
                    if (!std::strcmp(f.name, "act_bits")) p.actBits = v;
                    else if (!std::strcmp(f.name, "w_bits")) p.wBits = v;
                    else if (!std::strcmp(f.name, "in_features")) p.inFeatures = v;
                    else if (!std::strcmp(f.name, "out_features")) p.outFeatures = v;
                    else if (!std::strcmp(f.name, "act_groups")) p.actGroups = v;
                    else if (!std::strcmp(f.name, "has_bias")) p.hasBias = v;
                }
                else if (f.type == PluginFieldType::kFLOAT32)
                {
                    auto const* v = static_cast<float const*>(f.data);
                    std::vector<float> values(v, v + f.length);
                    if (!std::strcmp(f.name, "act_lower")) p.actLower = std::move(values);
                    else if (!std::strcmp(f.name, "act_upper")) p.actUpper = std::move(values);
                    else if (!std::strcmp(f.name, "w_lower")) p.wLower = std::move(values);
                    else if (!std::strcmp(f.name, "w_scale")) p.wScale = std::move(values);
                }
            }
            std::string const why = p.validate();
            if (!why.empty())
            {
                logError(std::string(name != nullptr ? name : "?") + ": " + why);
                return nullptr;
            }
            return new LowBitLinearPlugin(std::move(p));
        }
        catch (std::exception const& e)
        {
            logError(e.what());
        }
        return nullptr;
    }

private:
    std::vector<PluginField> mFieldNames;
    PluginFieldCollection mFC{};
};

} // namespace

// Entry points for IPluginRegistry::loadLibrary, trtexec --dynamicPlugins / --staticPlugins and
// BuilderConfig.plugins_to_serialize (TensorRT >= 10.0 plugin-library interface).
extern "C" __attribute__((visibility("default"))) void setLoggerFinder(ILoggerFinder* finder)
{
    std::lock_guard<std::mutex> lock(gLoggerMutex);
    gLoggerFinder = finder;
}

extern "C" __attribute__((visibility("default"))) IPluginCreatorInterface* const* getCreators(int32_t& nbCreators)
{
    static LowBitLinearPluginCreator sCreator;
    static IPluginCreatorInterface* const sCreators[] = {&sCreator};
    nbCreators = 1;
    return sCreators;
}
