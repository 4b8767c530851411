import CLoLDU
import Foundation
import Testing

/// Leaving the library through the C ABI: coefficients, LoRA exports, adapters and merges on
/// model files (a model directory written with loldu_export_merged, as a model's safetensors).
@Suite struct ExportTests {
    static func message() -> String { String(cString: loldu_last_error()) }

    /// Two layers with biases on random weights, trained (z, σ changed), and their base model
    /// directory: `model.safetensors` holding `NAME.weight` = W and `NAME.bias`.
    final class Fixture {
        let directory: String
        let names = ["encoder.q", "encoder.ffn"]
        let adapters: [TestAdapter<Float>]

        init() throws {
            directory = try temporaryDirectory()
            var random = TestRandom(11)
            adapters = try [(12, 9), (7, 12)].enumerated().map { i, shape in
                try TestAdapter<Float>(m: shape.0, n: shape.1, weight: random.array(shape.0 * shape.1), bias: random.array(shape.0)) {
                    $0.rank = Int64(4 + i)
                }
            }
            try FileManager.default.createDirectory(atPath: "\(directory)/base", withIntermediateDirectories: false)
            let written = withCStrings(names) { loldu_export_merged("\(directory)/base/model.safetensors", adapters.map { $0.handle }, $0, 2) }
            guard written == LOLDU_OK else { throw LibraryError(status: written, message: ExportTests.message()) }
            try Data("{\"model_type\": \"test\", \"torch_dtype\": \"float32\"}".utf8).write(to: URL(fileURLWithPath: "\(directory)/base/config.json"))
            for a in adapters {
                a.z = a.z.enumerated().map { $0.element + Float($0.offset) * 0.1 - 0.15 }
                a.sigma = 1.25
                a.setPath(LOLDU_PATH_FACTORED)
            }
            let saved = withCStrings(names) { loldu_checkpoint_save("\(directory)/ckpt", adapters.map { $0.handle }, $0, 2) }
            guard saved == LOLDU_OK else { throw LibraryError(status: saved, message: ExportTests.message()) }
        }

        func checkpoint() throws -> OpaquePointer {
            var c: OpaquePointer?
            let status = loldu_checkpoint_open(&c, "\(directory)/ckpt")
            guard status == LOLDU_OK, let c else { throw LibraryError(status: status, message: ExportTests.message()) }
            return c
        }
    }

    @Test func coefficientsAreTheWholeUpdate() throws {
        let f = try Fixture()
        for a in f.adapters {
            var c = [Float](repeating: .nan, count: a.rank)
            #expect(loldu_get_coefficients(a.handle, &c) == LOLDU_OK)
            let scaled = (0..<(a.m * a.rank)).map { Double(a.factor(LOLDU_FACTOR_LOWER)[$0]) * Double(c[$0 % a.rank]) }
            let delta = matmul(scaled.map { Float($0) }, a.factor(LOLDU_FACTOR_UPPER), a.m, a.rank, a.n)
            let effective = a.effectiveWeight
            for i in 0..<(a.m * a.n) {
                #expect(abs(Double(a.weight[i]) + delta[i] - Double(effective[i])) <= 1e-5 * (1 + abs(Double(effective[i]))))
            }
        }
        // A fresh adapter has c = 0 (its update is inside W_res); so has a derived one.
        var random = TestRandom(3)
        let fresh = try TestAdapter<Double>(m: 6, n: 5, weight: random.array(30)) { $0.rank = 3 }
        var c = [Double](repeating: .nan, count: 3)
        #expect(loldu_get_coefficients(fresh.handle, &c) == LOLDU_OK)
        #expect(c == [0, 0, 0])
        #expect(loldu_get_coefficients(fresh.handle, nil) == LOLDU_ERR_NULL_POINTER)
    }

    @Test func loraOptionsAreValidatedAndNothingIsWritten() throws {
        let f = try Fixture()
        let out = "\(f.directory)/lora"
        func export(_ configure: (inout loldu_lora_options) -> Void, layers: [loldu_lora_layer]? = nil) -> loldu_status {
            var options = loldu_lora_options()
            #expect(loldu_lora_options_default(&options) == LOLDU_OK)
            #expect(options.dtype == LOLDU_FLOAT32.i32 && options.replace == 0 && options.layers == nil)
            configure(&options)
            return withCStrings(f.names) { names in
                if let layers {
                    return layers.withUnsafeBufferPointer { list in
                        options.layers = list.baseAddress
                        return loldu_export_lora(out, f.adapters.map { $0.handle }, names, 2, &options)
                    }
                }
                return loldu_export_lora(out, f.adapters.map { $0.handle }, names, 2, &options)
            }
        }
        #expect(export { $0.struct_size -= 8 } == LOLDU_ERR_INVALID_ARGUMENT)
        #expect(Self.message().contains("options.struct_size"))
        #expect(export { $0.dtype = 9 } == LOLDU_ERR_INVALID_ARGUMENT)
        #expect(export { $0.replace = 2 } == LOLDU_ERR_INVALID_ARGUMENT)
        #expect(Self.message().contains("options.replace"))
        #expect(export({ _ in }, layers: [loldu_lora_layer(kind: 7, kernel_dims: 0, kernel: (0, 0, 0)), loldu_lora_layer()]) == LOLDU_ERR_INVALID_ARGUMENT)
        #expect(Self.message().contains("options.layers[0].kind"))
        let conv = loldu_lora_layer(kind: LOLDU_LORA_CONV.i32, kernel_dims: 4, kernel: (1, 1, 1))
        #expect(export({ _ in }, layers: [loldu_lora_layer(), conv]) == LOLDU_ERR_INVALID_ARGUMENT)
        #expect(Self.message().contains("options.layers[1].kernel_dims"))
        let odd = loldu_lora_layer(kind: LOLDU_LORA_CONV.i32, kernel_dims: 2, kernel: (5, 1, 0))  // 5 does not divide n = 9
        #expect(export({ _ in }, layers: [odd, loldu_lora_layer()]) == LOLDU_ERR_INVALID_ARGUMENT)
        #expect(Self.message().contains("layer \"encoder.q\""))
        let huge = loldu_lora_layer(kind: LOLDU_LORA_CONV.i32, kernel_dims: 3, kernel: (Int64(Int32.max), Int64(Int32.max), Int64(Int32.max)))
        #expect(export({ _ in }, layers: [huge, loldu_lora_layer()]) == LOLDU_ERR_INVALID_ARGUMENT, "a product past Int64: refused, not a trap")
        #expect(!FileManager.default.fileExists(atPath: out))
        // A conv whose kernel divides n, and the defaults: both write a directory.
        let fits = loldu_lora_layer(kind: LOLDU_LORA_CONV.i32, kernel_dims: 1, kernel: (3, 0, 0))
        #expect(export({ _ in }, layers: [fits, loldu_lora_layer()]) == LOLDU_OK, "\(Self.message())")
        #expect(export { _ in } == LOLDU_ERR_IO)
        #expect(Self.message().contains("already exists"))
        #expect(export { $0.replace = 1 } == LOLDU_OK)
        let entries = try FileManager.default.contentsOfDirectory(atPath: f.directory).filter { $0.hasPrefix(".") }
        #expect(entries.isEmpty)
        #expect(withCStrings(f.names) { loldu_export_lora("\(f.directory)/defaults", f.adapters.map { $0.handle }, $0, 2, nil) } == LOLDU_OK)
    }

    @Test func adaptersFromModelFilesComputeAsTheSavedOnes() throws {
        let f = try Fixture()
        let c = try f.checkpoint()
        defer { loldu_checkpoint_free(c) }
        var random = TestRandom(5)
        for (name, original) in zip(f.names, f.adapters) {
            var out: OpaquePointer?
            #expect(loldu_checkpoint_create(&out, c, name, "\(f.directory)/base") == LOLDU_OK, "\(Self.message())")
            let loaded = TestAdapter<Float>(adopting: out!, m: original.m, n: original.n, rank: original.rank)
            loaded.setPath(LOLDU_PATH_FACTORED)
            let x: [Float] = random.array(3 * original.n)
            #expect(loaded.forward(x, batch: 3) == original.forward(x, batch: 3))
            #expect(loaded.bias == original.bias)
            var z = [Double](repeating: .nan, count: original.rank), sigma = 0.0
            var print = [CChar](repeating: 0, count: 17)
            #expect(loldu_checkpoint_values(c, name, &z, &sigma, &print, nil) == LOLDU_OK)
            #expect(z == original.z.map(Double.init) && sigma == 1.25 && strlen(print) == 16)
        }
        var out: OpaquePointer?
        #expect(loldu_checkpoint_create(&out, c, "missing", "\(f.directory)/base") == LOLDU_ERR_MISMATCH)
        #expect(loldu_checkpoint_create(&out, c, f.names[0], "\(f.directory)/nowhere") == LOLDU_ERR_IO)
        #expect(loldu_checkpoint_create(&out, c, f.names[0], "\(f.directory)/ckpt") == LOLDU_ERR_IO)
        #expect(Self.message().contains("neither model.safetensors"))
        #expect(out == nil)
    }

    @Test func mergeWritesWhatExportMergedWritesAndCanBeStopped() throws {
        let f = try Fixture()
        let c = try f.checkpoint()
        defer { loldu_checkpoint_free(c) }
        // The merged file is byte for byte what loldu_export_merged writes for the trained adapters
        // (same tensors, order and metadata; W + A diag(c) U_r rounded once).
        #expect(loldu_merge_model("\(f.directory)/merged", "\(f.directory)/base", c, nil) == LOLDU_OK, "\(Self.message())")
        #expect(withCStrings(f.names) { loldu_export_merged("\(f.directory)/expected.safetensors", f.adapters.map { $0.handle }, $0, 2) } == LOLDU_OK)
        let merged = try Data(contentsOf: URL(fileURLWithPath: "\(f.directory)/merged/model.safetensors"))
        #expect(merged == (try Data(contentsOf: URL(fileURLWithPath: "\(f.directory)/expected.safetensors"))))
        #expect((try Data(contentsOf: URL(fileURLWithPath: "\(f.directory)/merged/config.json"))) ==
                (try Data(contentsOf: URL(fileURLWithPath: "\(f.directory)/base/config.json"))))

        final class Calls { var done: [UInt64] = []; var stopAt = Int.max }
        let calls = Calls()
        var options = loldu_merge_options()
        #expect(loldu_merge_options_default(&options) == LOLDU_OK)
        options.dtype = LOLDU_BFLOAT16.i32
        options.user = Unmanaged.passUnretained(calls).toOpaque()
        options.progress = { user, done, total, tensor in
            let calls = Unmanaged<Calls>.fromOpaque(user!).takeUnretainedValue()
            calls.done.append(done)
            #expect(done <= total && tensor != nil)
            return calls.done.count >= calls.stopAt ? 1 : 0
        }
        #expect(loldu_merge_model("\(f.directory)/bf16", "\(f.directory)/base", c, &options) == LOLDU_OK)
        #expect(calls.done.count == 4 && calls.done == calls.done.sorted())
        let config = try String(contentsOfFile: "\(f.directory)/bf16/config.json", encoding: .utf8)
        #expect(config.contains("\"torch_dtype\": \"bfloat16\""))
        calls.done = []
        calls.stopAt = 2
        #expect(loldu_merge_model("\(f.directory)/stopped", "\(f.directory)/base", c, &options) == LOLDU_ERR_CANCELLED)
        #expect(String(cString: loldu_status_string(Int32(LOLDU_ERR_CANCELLED.rawValue))) == "cancelled")
        #expect(!FileManager.default.fileExists(atPath: "\(f.directory)/stopped"))
        options.dtype = LOLDU_FLOAT64.i32
        #expect(loldu_merge_model("\(f.directory)/f64", "\(f.directory)/base", c, &options) == LOLDU_ERR_INVALID_ARGUMENT)
        #expect(Self.message().contains("options.dtype"))
        #expect(loldu_merge_model("\(f.directory)/merged", "\(f.directory)/base", c, nil) == LOLDU_ERR_IO)
        #expect(Self.message().contains("already exists"))
        let leftovers = try FileManager.default.contentsOfDirectory(atPath: f.directory).filter { $0.hasPrefix(".") }
        #expect(leftovers.isEmpty)
    }

    /// A merge checks every layer's base weight before it writes anything: a base whose last
    /// adapted weight differs is refused before the first tensor is written. A shard truncated
    /// by another process during the merge is a format error (the files are read, not mapped:
    /// no SIGBUS), and neither leaves an output directory.
    @Test func mergeChecksEveryLayerFirstAndSurvivesATruncatedShard() throws {
        let f = try Fixture()
        let c = try f.checkpoint()
        defer { loldu_checkpoint_free(c) }
        let file = "\(f.directory)/base/model.safetensors"
        let original = try Data(contentsOf: URL(fileURLWithPath: file))
        let bytes = [UInt8](original)
        let (header, dataStart) = try CheckpointTests.header(bytes)
        let last = f.names.map { "\($0).weight" }.max { a, b in
            ((header[a] as! [String: Any])["data_offsets"] as! [Int])[0] < ((header[b] as! [String: Any])["data_offsets"] as! [Int])[0]
        }!
        var changed = bytes
        changed[dataStart + ((header[last] as! [String: Any])["data_offsets"] as! [Int])[1] - 1] ^= 0x01
        try Data(changed).write(to: URL(fileURLWithPath: file))

        final class Calls { var count = 0; var truncate: String? }
        let calls = Calls()
        var options = loldu_merge_options()
        #expect(loldu_merge_options_default(&options) == LOLDU_OK)
        options.user = Unmanaged.passUnretained(calls).toOpaque()
        options.progress = { user, _, _, _ in
            let calls = Unmanaged<Calls>.fromOpaque(user!).takeUnretainedValue()
            calls.count += 1
            if let path = calls.truncate { _ = truncate(path, 64) }
            return 0
        }
        #expect(loldu_merge_model("\(f.directory)/wrong", "\(f.directory)/base", c, &options) == LOLDU_ERR_MISMATCH)
        #expect(Self.message().contains(last), "\(Self.message())")
        #expect(calls.count == 0, "the merge wrote \(calls.count) tensors before finding the wrong weight")
        #expect(!FileManager.default.fileExists(atPath: "\(f.directory)/wrong"))

        try original.write(to: URL(fileURLWithPath: file))
        calls.truncate = file
        #expect(loldu_merge_model("\(f.directory)/cut", "\(f.directory)/base", c, &options) == LOLDU_ERR_FORMAT)
        #expect(Self.message().contains("truncated or replaced while in use"), "\(Self.message())")
        #expect(calls.count == 1)
        #expect(!FileManager.default.fileExists(atPath: "\(f.directory)/cut"))

        // Shards that both hold a tensor of one name are refused, not guessed between (one of
        // them could be another shape).
        let sharded = "\(f.directory)/sharded"
        try FileManager.default.createDirectory(atPath: sharded, withIntermediateDirectories: false)
        try original.write(to: URL(fileURLWithPath: "\(sharded)/a.safetensors"))
        #expect(withCStrings([f.names[0]]) { loldu_export_merged("\(sharded)/b.safetensors", [f.adapters[0].handle], $0, 1) } == LOLDU_OK)
        let bias = "\(f.names[0]).bias"  // indexed to b; a holds it too, as it holds the weight
        let map = header.keys.filter { $0 != "__metadata__" }.map { "\"\($0)\": \"\($0 == bias ? "b" : "a").safetensors\"" }
            .joined(separator: ", ")
        try Data("{\"weight_map\": {\(map)}}".utf8).write(to: URL(fileURLWithPath: "\(sharded)/model.safetensors.index.json"))
        #expect(loldu_merge_model("\(f.directory)/twice", sharded, c, nil) == LOLDU_ERR_FORMAT)
        #expect(Self.message().contains("is in both a.safetensors and b.safetensors"), "\(Self.message())")
        #expect(!FileManager.default.fileExists(atPath: "\(f.directory)/twice"))
    }
}
