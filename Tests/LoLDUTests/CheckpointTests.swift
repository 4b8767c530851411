import CLoLDU
import Foundation
import Testing

/// Adapter checkpoints and merged exports: round trips, the file format, and hostile files.
@Suite struct CheckpointTests {
    struct Layer {
        let name: String
        let m: Int, n: Int
        let w: [Double]
        let b: [Double]?
        let edit: (inout loldu_config) -> Void
    }

    static func layers() -> [Layer] {
        var random = TestRandom(97)
        return [
            Layer(name: "encoder.layer.0.attention.self.query", m: 12, n: 10, w: random.array(120), b: random.array(12)) { $0.rank = 4 },
            Layer(name: "encoder.layer.0.attention.self.value", m: 10, n: 12, w: random.array(120), b: nil) {
                $0.rank = 10; $0.z_init = LOLDU_INIT_S_NORMAL.i32; $0.residual = LOLDU_RESIDUAL_INIT.i32; $0.seed = 1234; $0.alpha = 3
            },
            Layer(name: "classifier \"head\" ∑", m: 3, n: 10, w: random.array(30), b: random.array(3)) { $0.rank = 2; $0.train_sigma = 0 },
        ]
    }

    /// Saves trained adapters of type `T` into a new directory; returns it, the inputs and outputs.
    static func saveTrained<T: TestScalar>(_: T.Type) throws -> (directory: String, outputs: [[T]], x: [[T]]) {
        let directory = try temporaryDirectory()
        var random = TestRandom(101)
        var adapters: [TestAdapter<T>] = []
        var outputs: [[T]] = [], inputs: [[T]] = []
        for layer in layers() {
            let a = try TestAdapter<T>(m: layer.m, n: layer.n, weight: layer.w.map { T($0) }, bias: layer.b?.map { T($0) }, configure: layer.edit)
            a.z = random.array(a.rank)
            if a.info.train_sigma == 1 { a.sigma = 0.75 }
            let x: [T] = random.array(5 * layer.n)
            inputs.append(x)
            outputs.append(a.forward(x, batch: 5))
            adapters.append(a)
        }
        let handles: [OpaquePointer?] = adapters.map(\.handle)
        let names = layers().map(\.name)
        let status = withCStrings(names) { loldu_checkpoint_save(directory, handles, $0, handles.count) }
        #expect(status == LOLDU_OK, "\(String(cString: loldu_last_error()))")
        return (directory, outputs, inputs)
    }

    @Test func roundTripIsBitIdentical() throws {
        try check(Float.self)
        try check(Double.self)

        func check<T: TestScalar>(_: T.Type) throws {
            let saved = try Self.saveTrained(T.self)
            var checkpoint: OpaquePointer?
            #expect(loldu_checkpoint_open(&checkpoint, saved.directory) == LOLDU_OK, "\(String(cString: loldu_last_error()))")
            defer { loldu_checkpoint_free(checkpoint) }
            var count = 0
            #expect(loldu_checkpoint_count(checkpoint, &count) == LOLDU_OK && count == 3)
            for (i, layer) in Self.layers().enumerated() {
                var name: UnsafePointer<CChar>?
                #expect(loldu_checkpoint_name(checkpoint, i, &name) == LOLDU_OK)
                #expect(String(cString: name!) == layer.name)
                // Re-create the adapter from the base weight with the saved configuration.
                var dtype = LOLDU_FLOAT32, m: Int64 = 0, n: Int64 = 0, config = loldu_config()
                #expect(loldu_checkpoint_layer(checkpoint, layer.name, &dtype, &m, &n, &config) == LOLDU_OK)
                #expect(dtype == T.dtype && m == Int64(layer.m) && n == Int64(layer.n))
                let fresh = try TestAdapter<T>(m: layer.m, n: layer.n, weight: layer.w.map { T($0) }, bias: layer.b?.map { T($0) }) {
                    $0 = config
                }
                #expect(loldu_checkpoint_apply(checkpoint, layer.name, fresh.handle) == LOLDU_OK, "\(String(cString: loldu_last_error()))")
                #expect(fresh.forward(saved.x[i], batch: 5) == saved.outputs[i], "\(T.self) \(layer.name): identical outputs")

                // Another base weight, another configuration, another name: refused, nothing changed.
                var other = layer.w
                other[0] += 1e-3
                let wrongBase = try TestAdapter<T>(m: layer.m, n: layer.n, weight: other.map { T($0) }) { $0 = config }
                let before = wrongBase.z
                #expect(loldu_checkpoint_apply(checkpoint, layer.name, wrongBase.handle) == LOLDU_ERR_MISMATCH)
                #expect(String(cString: loldu_last_error()).contains("base weight"))
                #expect(wrongBase.z == before)
                let wrongRank = try TestAdapter<T>(m: layer.m, n: layer.n, weight: layer.w.map { T($0) }) {
                    $0 = config; $0.rank = 1
                }
                #expect(loldu_checkpoint_apply(checkpoint, layer.name, wrongRank.handle) == LOLDU_ERR_MISMATCH)
                #expect(String(cString: loldu_last_error()).contains("rank"))
                #expect(loldu_checkpoint_apply(checkpoint, "no.such.layer", fresh.handle) == LOLDU_ERR_MISMATCH)
            }
            var config = loldu_config()
            #expect(loldu_checkpoint_layer(checkpoint, "no.such.layer", nil, nil, nil, &config) == LOLDU_ERR_MISMATCH)
        }
    }

    /// The file is plain safetensors: read here with Foundation's JSON parser as an independent
    /// reader, and about 4·(r + 1) bytes per layer plus the header.
    @Test func fileFormatAndSize() throws {
        let saved = try Self.saveTrained(Float.self)
        let bytes = try Data(contentsOf: URL(fileURLWithPath: saved.directory + "/adapter_model.safetensors"))
        let headerLength = Int(bytes.prefix(8).enumerated().reduce(UInt64(0)) { $0 | UInt64($1.element) << (8 * UInt64($1.offset)) })
        let header = try #require(try JSONSerialization.jsonObject(with: bytes.subdata(in: 8..<(8 + headerLength))) as? [String: Any])
        let ranks = [4, 10, 2]
        #expect(bytes.count - 8 - headerLength == ranks.reduce(0) { $0 + 4 * ($1 + 1) })
        #expect(headerLength % 8 == 0)
        #expect(headerLength < 400 * ranks.count, "header of \(headerLength) bytes")
        for (layer, r) in zip(Self.layers(), ranks) {
            let z = try #require(header[layer.name + ".loldu_z"] as? [String: Any])
            #expect(z["dtype"] as? String == "F32")
            #expect(z["shape"] as? [Int] == [r])
            let sigma = try #require(header[layer.name + ".loldu_sigma"] as? [String: Any])
            #expect(sigma["shape"] as? [Int] == [1])
        }
        let metadata = try #require(header["__metadata__"] as? [String: String])
        #expect(metadata["format"] == "pt")
        #expect(metadata[Self.layers()[0].name + ".weight_fingerprint"]?.count == 16)

        let config = try #require(try JSONSerialization.jsonObject(
            with: Data(contentsOf: URL(fileURLWithPath: saved.directory + "/adapter_config.json"))) as? [String: Any])
        #expect(config["peft_type"] as? String == "LOLDU")
        #expect(config["r"] as? Int == 4)
        #expect(config["target_modules"] as? [String] == Self.layers().map(\.name))
        #expect(config["library_version"] as? String == LOLDU_VERSION_STRING)
        let layers = try #require(config["layers"] as? [String: [String: Any]])
        #expect(layers[Self.layers()[1].name]?["residual"] as? String == "init")
        #expect(layers[Self.layers()[1].name]?["alpha"] as? Double == 3)
    }

    @Test func mergedExportHoldsTheEffectiveWeights() throws {
        var random = TestRandom(103)
        let a = try TestAdapter<Double>(m: 6, n: 4, weight: random.array(24), bias: random.array(6)) { $0.rank = 3 }
        let b = try TestAdapter<Double>(m: 3, n: 6, weight: random.array(18)) { $0.rank = 2 }
        a.z = random.array(3)
        b.z = random.array(2)
        let directory = try temporaryDirectory()
        let path = directory + "/merged.safetensors"
        let status = withCStrings(["q", "v"]) { loldu_export_merged(path, [a.handle, b.handle], $0, 2) }
        #expect(status == LOLDU_OK, "\(String(cString: loldu_last_error()))")
        let tensors = try readSafetensors(path)
        #expect(Set(tensors.keys) == ["q.weight", "q.bias", "v.weight"])
        #expect(tensors["q.weight"]?.shape == [6, 4] && tensors["q.weight"]?.values == a.effectiveWeight)
        #expect(tensors["q.bias"]?.values == a.factor(LOLDU_FACTOR_BIAS))
        #expect(tensors["v.weight"]?.values == b.effectiveWeight)
    }

    // MARK: Hostile files

    struct Corruption: CustomStringConvertible, Sendable {
        let name: String
        let file: String  // "model" or "config"
        let expected: loldu_status
        let mentions: String
        let mutate: @Sendable ([UInt8]) -> [UInt8]?  // nil: delete the file
        var description: String { name }
    }

    /// Rewrites a safetensors file's header text.
    /// The length of a safetensors file's JSON header (its first 8 bytes, little-endian).
    static func headerLength(_ bytes: [UInt8]) -> Int {
        Int(bytes[0..<8].enumerated().reduce(UInt64(0)) { $0 | UInt64($1.element) << (8 * UInt64($1.offset)) })
    }

    /// A safetensors file's header, parsed, and the offset of its data section: tensor `NAME`'s
    /// bytes are `dataStart + data_offsets`.
    static func header(_ bytes: [UInt8]) throws -> (entries: [String: Any], dataStart: Int) {
        let length = headerLength(bytes)
        let entries = try JSONSerialization.jsonObject(with: Data(bytes[8..<(8 + length)])) as! [String: Any]
        return (entries, 8 + length)
    }

    static func rewriteHeader(_ bytes: [UInt8], _ edit: (String) -> String) -> [UInt8] {
        let length = headerLength(bytes)
        let header = Array(edit(String(decoding: bytes[8..<(8 + length)], as: UTF8.self)).utf8)
        var out = (0..<8).map { UInt8(truncatingIfNeeded: UInt64(header.count) >> (8 * UInt64($0))) }
        out += header
        out += bytes[(8 + length)...]
        return out
    }

    static let z0 = "encoder.layer.0.attention.self.query.loldu_z"

    static let corruptions: [Corruption] = [
        Corruption(name: "empty file", file: "model", expected: LOLDU_ERR_FORMAT, mentions: "truncated") { _ in [] },
        Corruption(name: "truncated header length", file: "model", expected: LOLDU_ERR_FORMAT, mentions: "truncated") { Array($0[0..<5]) },
        Corruption(name: "truncated data", file: "model", expected: LOLDU_ERR_FORMAT, mentions: "outside the data section") {
            Array($0.dropLast(6))
        },
        Corruption(name: "header length beyond the file", file: "model", expected: LOLDU_ERR_FORMAT, mentions: "past the end") {
            var b = $0
            b[5] = 0x7F
            return b
        },
        Corruption(name: "header is not JSON", file: "model", expected: LOLDU_ERR_FORMAT, mentions: "invalid JSON") {
            rewriteHeader($0) { "{" + $0.dropFirst(2) }
        },
        Corruption(name: "header is a list", file: "model", expected: LOLDU_ERR_FORMAT, mentions: "not a JSON object") {
            rewriteHeader($0) { _ in "[]" }
        },
        Corruption(name: "wrong dtype", file: "model", expected: LOLDU_ERR_FORMAT, mentions: "dtype") {
            rewriteHeader($0) { $0.replacingOccurrences(of: "\"F32\"", with: "\"I32\"") }
        },
        Corruption(name: "unknown dtype", file: "model", expected: LOLDU_ERR_FORMAT, mentions: "unknown dtype") {
            rewriteHeader($0) { $0.replacingOccurrences(of: "\"F32\"", with: "\"F99\"") }
        },
        Corruption(name: "wrong shape", file: "model", expected: LOLDU_ERR_FORMAT, mentions: "shape") {
            rewriteHeader($0) { $0.replacingOccurrences(of: "\"shape\":[4]", with: "\"shape\":[2,2]") }
        },
        Corruption(name: "shape and offsets disagree", file: "model", expected: LOLDU_ERR_FORMAT, mentions: "needs") {
            rewriteHeader($0) { $0.replacingOccurrences(of: "\"shape\":[4]", with: "\"shape\":[5]") }
        },
        Corruption(name: "negative dimension", file: "model", expected: LOLDU_ERR_FORMAT, mentions: "dimension") {
            rewriteHeader($0) { $0.replacingOccurrences(of: "\"shape\":[4]", with: "\"shape\":[-4]") }
        },
        Corruption(name: "huge dimensions", file: "model", expected: LOLDU_ERR_FORMAT, mentions: "larger than the file") {
            rewriteHeader($0) { $0.replacingOccurrences(of: "\"shape\":[4]", with: "\"shape\":[9223372036854775807,4]") }
        },
        Corruption(name: "missing tensor", file: "model", expected: LOLDU_ERR_FORMAT, mentions: "missing tensor") {
            rewriteHeader($0) { $0.replacingOccurrences(of: z0, with: "renamed") }
        },
        Corruption(name: "duplicate tensor", file: "model", expected: LOLDU_ERR_FORMAT, mentions: "duplicate key") {
            rewriteHeader($0) { h in
                guard let start = h.range(of: "\"\(z0)\":{"), let end = h[start.upperBound...].firstIndex(of: "}") else { return h }
                let entry = String(h[start.lowerBound...end])
                return h.replacingOccurrences(of: entry, with: entry + "," + entry)
            }
        },
        Corruption(name: "overlapping tensors", file: "model", expected: LOLDU_ERR_FORMAT, mentions: "overlaps") {
            rewriteHeader($0) { h in
                // Point the first z at the first σ's bytes as well (then a gap follows).
                h.replacingOccurrences(of: "\"data_offsets\":[4,20]", with: "\"data_offsets\":[0,16]")
            }
        },
        Corruption(name: "trailing bytes", file: "model", expected: LOLDU_ERR_FORMAT, mentions: "belong to no tensor") { $0 + [0, 0, 0, 0] },
        Corruption(name: "NaN in z", file: "model", expected: LOLDU_ERR_FORMAT, mentions: "must be finite") {
            var b = $0
            let length = Int(b[0]) | Int(b[1]) << 8
            let at = 8 + length + 4 + 4  // σ of the first layer, then z[1]
            b.replaceSubrange(at..<(at + 4), with: [0, 0, 0xC0, 0x7F])
            return b
        },
        Corruption(name: "unexpected tensor", file: "model", expected: LOLDU_ERR_FORMAT, mentions: "unexpected tensor") {
            rewriteHeader($0) { "{\"stray\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[0,0]}," + $0.dropFirst() }
        },
        Corruption(name: "bad fingerprint", file: "model", expected: LOLDU_ERR_FORMAT, mentions: "weight_fingerprint") {
            rewriteHeader($0) { h in
                h.replacingOccurrences(of: "\"encoder.layer.0.attention.self.query.weight_fingerprint\":\"", with: "\"encoder.layer.0.attention.self.query.weight_fingerprint\":\"X")
            }
        },
        Corruption(name: "fingerprint of fullwidth letters", file: "model", expected: LOLDU_ERR_FORMAT, mentions: "weight_fingerprint") {
            rewriteHeader($0) { h in  // (16 characters that are hexadecimal digits to Unicode, not ASCII)
                let key = "\"encoder.layer.0.attention.self.query.weight_fingerprint\":\""
                guard let start = h.range(of: key) else { return h }
                let end = h.index(start.upperBound, offsetBy: 16)
                return h.replacingCharacters(in: start.upperBound..<end, with: String(repeating: "\u{FF42}", count: 16))
            }
        },
        Corruption(name: "missing model file", file: "model", expected: LOLDU_ERR_IO, mentions: "cannot open") { _ in nil },
        Corruption(name: "config is not JSON", file: "config", expected: LOLDU_ERR_FORMAT, mentions: "invalid JSON") { Array($0.dropLast(5)) },
        Corruption(name: "config without layers", file: "config", expected: LOLDU_ERR_FORMAT, mentions: "layers") {
            Array(String(decoding: $0, as: UTF8.self).replacingOccurrences(of: "\"layers\"", with: "\"other\"").utf8)
        },
        Corruption(name: "config names another layer", file: "config", expected: LOLDU_ERR_FORMAT, mentions: "different layers") {
            Array(String(decoding: $0, as: UTF8.self).replacingOccurrences(of: "\"encoder.layer.0.attention.self.value\",", with: "\"decoder\",").utf8)
        },
        Corruption(name: "unknown z init", file: "config", expected: LOLDU_ERR_FORMAT, mentions: "z_init") {
            Array(String(decoding: $0, as: UTF8.self).replacingOccurrences(of: "\"s_normal\"", with: "\"gaussian\"").utf8)
        },
        Corruption(name: "rank beyond the shape", file: "config", expected: LOLDU_ERR_FORMAT, mentions: "rank") {
            Array(String(decoding: $0, as: UTF8.self).replacingOccurrences(of: "\"r\":10", with: "\"r\":11").utf8)
        },
        Corruption(name: "alpha overflowing sigma", file: "config", expected: LOLDU_ERR_FORMAT, mentions: "not a finite nonzero float32") {
            Array(String(decoding: $0, as: UTF8.self).replacingOccurrences(of: "\"alpha\":[0-9.]+", with: "\"alpha\":1e300", options: .regularExpression).utf8)
        },
        Corruption(name: "alpha underflowing sigma", file: "config", expected: LOLDU_ERR_FORMAT, mentions: "not a finite nonzero float32") {
            Array(String(decoding: $0, as: UTF8.self).replacingOccurrences(of: "\"alpha\":[0-9.]+", with: "\"alpha\":1e-320", options: .regularExpression).utf8)
        },
        Corruption(name: "deeply nested config", file: "config", expected: LOLDU_ERR_FORMAT, mentions: "nesting") { _ in
            Array((String(repeating: "[", count: 100_000) + String(repeating: "]", count: 100_000)).utf8)
        },
        Corruption(name: "missing config file", file: "config", expected: LOLDU_ERR_IO, mentions: "cannot open") { _ in nil },
    ]

    @Test(arguments: corruptions)
    func hostileFilesAreRefused(_ c: Corruption) throws {
        let saved = try Self.saveTrained(Float.self)
        let path = saved.directory + (c.file == "model" ? "/adapter_model.safetensors" : "/adapter_config.json")
        let original = try [UInt8](Data(contentsOf: URL(fileURLWithPath: path)))
        if let mutated = c.mutate(original) {
            #expect(mutated != original, "\(c.name): the corruption changed nothing")
            try Data(mutated).write(to: URL(fileURLWithPath: path))
        } else {
            try FileManager.default.removeItem(atPath: path)
        }
        var checkpoint: OpaquePointer?
        let status = loldu_checkpoint_open(&checkpoint, saved.directory)
        let message = String(cString: loldu_last_error())
        #expect(status == c.expected, "\(c.name): status \(status.rawValue), \(message)")
        #expect(message.contains(c.mentions), "\(c.name): \"\(message)\" should mention \"\(c.mentions)\"")
        #expect(checkpoint == nil)
    }

    @Test func badSaveArguments() throws {
        var random = TestRandom(107)
        let a = try TestAdapter<Float>(m: 4, n: 3, weight: random.array(12)) { $0.rank = 2 }
        let directory = try temporaryDirectory()
        let cases: [([String], loldu_status, String)] = [
            ([""], LOLDU_ERR_INVALID_ARGUMENT, "names[0]"),
            (["a\nb"], LOLDU_ERR_INVALID_ARGUMENT, "control character"),
            (["a\u{85}b"], LOLDU_ERR_INVALID_ARGUMENT, "control character"),
            ([String(repeating: "x", count: 513)], LOLDU_ERR_INVALID_ARGUMENT, "512"),
        ]
        for (names, expected, mention) in cases {
            let status = withCStrings(names) { loldu_checkpoint_save(directory, [a.handle], $0, 1) }
            #expect(status == expected && String(cString: loldu_last_error()).contains(mention), "\(names)")
        }
        let twice = withCStrings(["x", "x"]) { loldu_checkpoint_save(directory, [a.handle, a.handle], $0, 2) }
        #expect(twice == LOLDU_ERR_INVALID_ARGUMENT && String(cString: loldu_last_error()).contains("twice"))
        let noParent = withCStrings(["x"]) { loldu_checkpoint_save(directory + "/missing/dir", [a.handle], $0, 1) }
        #expect(noParent == LOLDU_ERR_IO)
        #expect(FileManager.default.createFile(atPath: directory + "/file", contents: Data()))
        let onFile = withCStrings(["x"]) { loldu_checkpoint_save(directory + "/file", [a.handle], $0, 1) }
        #expect(onFile == LOLDU_ERR_IO && String(cString: loldu_last_error()).contains("directory"))
        #expect(loldu_checkpoint_save(nil, [a.handle], nil, 1) == LOLDU_ERR_NULL_POINTER)
        // Nothing was left behind: no temporary files.
        #expect(try FileManager.default.contentsOfDirectory(atPath: directory) == ["file"])
    }

    @Test func saveRemovesItsOwnLeftoversOnly() throws {
        var random = TestRandom(109)
        let a = try TestAdapter<Float>(m: 4, n: 3, weight: random.array(12)) { $0.rank = 2 }
        let directory = try temporaryDirectory()
        // A killed save's temporary file, and another program's files of a similar name.
        let ours = ".adapter_model.safetensors.loldu-Ab3xY9"
        let others = [".adapter_model.safetensors.Ab3xY9", ".adapter_config.json.backup", ".adapter_model.safetensors.loldu-toolong"]
        for name in [ours] + others {
            #expect(FileManager.default.createFile(atPath: directory + "/" + name, contents: Data("keep".utf8)))
        }
        // A link named like a temporary file is not one: kept, and not followed.
        let link = ".adapter_config.json.loldu-Lnk123"
        try FileManager.default.createSymbolicLink(atPath: directory + "/" + link, withDestinationPath: others[0])
        let status = withCStrings(["layer"]) { loldu_checkpoint_save(directory, [a.handle], $0, 1) }
        #expect(status == LOLDU_OK)
        let hidden = try FileManager.default.contentsOfDirectory(atPath: directory).filter { $0.hasPrefix(".") }
        #expect(Set(hidden) == Set(others + [link]))
    }

    @Test func failedSaveKeepsThePreviousCheckpoint() throws {
        let saved = try Self.saveTrained(Float.self)
        let model = saved.directory + "/adapter_model.safetensors"
        let before = try Data(contentsOf: URL(fileURLWithPath: model))
        // A save that fails validation half-way (a dead handle after a live one) writes nothing.
        var random = TestRandom(109)
        let a = try TestAdapter<Float>(m: 4, n: 3, weight: random.array(12)) { $0.rank = 2 }
        let dead = OpaquePointer(bitPattern: 0x7777_0000)
        let status = withCStrings(["x", "y"]) { loldu_checkpoint_save(saved.directory, [a.handle, dead], $0, 2) }
        #expect(status == LOLDU_ERR_INVALID_HANDLE)
        #expect(try Data(contentsOf: URL(fileURLWithPath: model)) == before)
        #expect(try FileManager.default.contentsOfDirectory(atPath: saved.directory).sorted() == ["adapter_config.json", "adapter_model.safetensors"])
    }
}


/// Calls `body` with a C array of C strings.
func withCStrings<R>(_ strings: [String], _ body: (UnsafePointer<UnsafePointer<CChar>?>) -> R) -> R {
    let copies = strings.map { strdup($0) }
    defer { copies.forEach { free($0) } }
    let pointers = copies.map { UnsafePointer($0) }
    return pointers.withUnsafeBufferPointer { body($0.baseAddress!) }
}

/// A minimal independent safetensors reader for F64 files (Foundation's JSON parser).
func readSafetensors(_ path: String) throws -> [String: (shape: [Int], values: [Double])] {
    let bytes = try Data(contentsOf: URL(fileURLWithPath: path))
    let length = Int(bytes.prefix(8).enumerated().reduce(UInt64(0)) { $0 | UInt64($1.element) << (8 * UInt64($1.offset)) })
    let header = try JSONSerialization.jsonObject(with: bytes.subdata(in: 8..<(8 + length))) as? [String: Any] ?? [:]
    var result: [String: (shape: [Int], values: [Double])] = [:]
    for (name, entry) in header where name != "__metadata__" {
        guard let e = entry as? [String: Any], let shape = e["shape"] as? [Int], let offsets = e["data_offsets"] as? [Int] else { continue }
        let data = bytes.subdata(in: (8 + length + offsets[0])..<(8 + length + offsets[1]))
        let values = data.withUnsafeBytes { raw in (0..<(data.count / 8)).map { raw.loadUnaligned(fromByteOffset: $0 * 8, as: Double.self) } }
        result[name] = (shape, values)
    }
    return result
}
