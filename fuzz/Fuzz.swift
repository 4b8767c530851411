// libFuzzer entry point for the readers that take untrusted bytes: the safetensors reader, the
// JSON parser under it, and the checkpoint and optimiser-state readers on top of both. `make fuzz` compiles it into
// the core module (so it reaches internal functions) with libFuzzer and AddressSanitizer.
//
// Every input must end in a value or a thrown `LoLDUError`: a trap, an out-of-bounds access or
// a leak is a bug, which libFuzzer reports with the input that caused it.

import Glibc

/// A directory of this process's own for the checkpoint files, removed at exit.
private let directory: String = {
    var template = Array("/tmp/loldu-fuzz-XXXXXX".utf8CString)
    guard let made = mkdtemp(&template) else { fatalError("mkdtemp failed") }
    atexit {
        for file in [Checkpoint.configFile, Checkpoint.modelFile] { unlink("\(directory)/\(file)") }
        rmdir(directory)
    }
    return String(cString: made)
}()

private func write(_ bytes: ArraySlice<UInt8>, to path: String) {
    guard let file = fopen(path, "wb") else { fatalError("cannot write \(path)") }
    _ = bytes.withUnsafeBytes { fwrite($0.baseAddress, 1, $0.count, file) }
    fclose(file)
}

/// An optimiser configured as examples/c/train.c's (whose saved state seeds the corpus), so that
/// inputs close to that file get past the configuration check into the state buffers.
private let optimizer: Optimizer = {
    var identity = [Float](repeating: 0, count: 16 * 16)
    for i in 0..<16 { identity[i * 17] = 1 }
    var adapterConfig = AdapterConfig()
    adapterConfig.rank = 16
    let adapter = try! Adapter<Float, Float>(m: 16, n: 16, weight: identity, bias: nil, config: adapterConfig)
    var config = OptimizerConfig(kind: .adamW)
    config.lr = 0.05
    config.schedule = .linear
    config.warmupSteps = 30
    config.totalSteps = 300
    config.weightDecay = 0
    return try! Optimizer(config: config, adapters: [adapter])
}()

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzOneInput(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let bytes = Array(UnsafeBufferPointer(start: data, count: size))
    // The whole input as a safetensors file, each tensor read as both element types.
    if let file = try? SafeTensors.parse(bytes, what: "fuzz") {
        for (name, tensor) in file.tensors {
            _ = try? file.values(name, shape: tensor.shape, as: .float32)
            _ = try? file.values(name, shape: tensor.shape, as: .float64)
        }
    }
    // The whole input as an optimiser state; a step after any accepted state must not trap.
    if let source = try? bytes.withUnsafeBytes({ raw in try FileBytes(copying: raw) }),
       (try? optimizer.load(source, what: "fuzz")) != nil {
        _ = try? optimizer.step()
    }
    // The whole input as JSON.
    _ = bytes.withUnsafeBytes { try? JSON.parse($0, what: "fuzz") }
    // Split at the first NUL: adapter_config.json, then adapter_model.safetensors.
    if let nul = bytes.firstIndex(of: 0) {
        write(bytes[..<nul], to: "\(directory)/\(Checkpoint.configFile)")
        write(bytes[(nul + 1)...], to: "\(directory)/\(Checkpoint.modelFile)")
        if let checkpoint = try? Checkpoint(directory: directory) {
            for layer in checkpoint.layers { _ = try? checkpoint.layer(layer.name) }
        }
    }
    return 0
}
