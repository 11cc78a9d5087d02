/* Stand-ins for NVIDIA's native TensorRT libraries (libnvinfer, libnvonnxparser,
 * libnvinfer_plugin), so that the real compiled Python bindings import on a machine without
 * them: the bindings link these factory symbols and nothing else. Every factory returns NULL,
 * so `tensorrt.Builder()` raises; the conformance test only reads names, signatures and
 * docstrings. Compiled by tests/backends/test_tensorrt_conformance.py with the system C compiler,
 * once per library name (same symbols in each, distinct sonames). */
void *createInferBuilder_INTERNAL(void) { return 0; }
void *createInferRefitter_INTERNAL(void) { return 0; }
void *createInferRuntime_INTERNAL(void) { return 0; }
void *createNvOnnxParser_INTERNAL(void) { return 0; }
void *createNvOnnxParserRefitter_INTERNAL(void) { return 0; }
void *getPluginRegistry(void) { return 0; }
void *getBuilderPluginRegistry(void) { return 0; }
int getNvOnnxParserVersion(void) { return 0; }
int initLibNvInferPlugins(void) { return 0; }
