/// Adapter checkpoints: a directory like PEFT's `save_pretrained`.
///
/// - `adapter_model.safetensors`: per layer `NAME.loldu_z` (`r`) and `NAME.loldu_sigma` (`1`)
///   in the adapter's element type; `__metadata__` holds `NAME.weight_fingerprint` and
///   `NAME.pivots_fingerprint` (see ``fingerprint(_:)``), `format` and the library version.
/// - `adapter_config.json`: the shared settings at the top level (from the first layer), the
///   layer names in `target_modules`, and every layer's dtype, shape and configuration in
///   `layers`.
///
/// Loading re-derives the frozen factors from the base weight (the caller creates the adapter
/// with ``Checkpoint/Layer/config``), checks the fingerprints, and sets `z` and `σ`.
public final class Checkpoint: @unchecked Sendable {
    public static let modelFile = "adapter_model.safetensors"
    public static let configFile = "adapter_config.json"
    /// The largest checkpoint file read (both files hold a few bytes per layer).
    static let readLimit = 1 << 30

    public struct Layer: Sendable {
        public let name: String
        public let dtype: DType
        public let m: Int
        public let n: Int
        public let config: AdapterConfig
        let weightFingerprint: String
        let pivotsFingerprint: String
        let z: [Double]
        let sigma: Double
    }

    /// Layers in saved order.
    public let layers: [Layer]

    // MARK: Saving

    /// Checks that layer names are usable as tensor-name prefixes and all different.
    public static func validate(names: [String]) throws(LoLDUError) {
        var seen = Set<String>()
        for (i, name) in names.enumerated() {
            guard !name.isEmpty, name.utf8.count <= 512 else {
                throw .invalid("names[\(i)] must be 1 to 512 bytes long, got \(name.utf8.count)")
            }
            guard !name.unicodeScalars.contains(where: { $0.value < 0x20 || $0.value == 0x7F }) else {
                throw .invalid("names[\(i)] contains a control character")
            }
            guard seen.insert(name).inserted else { throw .invalid("names[\(i)] \"\(name)\" appears twice") }
        }
    }

    static func configJSON(_ c: AdapterConfig) -> [(String, JSON)] {
        [
            ("r", .number(c.rank)), ("alpha", .number(c.effectiveAlpha)), ("z_init", .string(c.zInit.name)),
            ("residual", .string(c.residual.name)), ("train_sigma", .bool(c.trainSigma)),
            ("seed", .number(String(c.seed))),
        ]
    }

    /// Saves adapters under names into `directory`, each file atomically.
    public static func save(_ adapters: [any AnyAdapter], names: [String], to directory: String) throws(LoLDUError) {
        try validate(names: names)
        try AtomicFile.makeDirectory(directory)
        var metadata = ["format": "pt", "loldu.version": libraryVersion]
        var entries: [SafeTensors.Entry] = []
        var layers: [(String, JSON)] = []
        for (adapter, name) in zip(adapters, names) {
            let (r, size, dtype) = (adapter.rank, adapter.dtype.byteSize, SafeTensors.name(of: adapter.dtype))
            let params = UnsafeRawPointer(adapter.paramsPointer)
            entries.append(.init(name: "\(name).loldu_sigma", dtype: dtype, shape: [1]) { out in
                out.copyMemory(from: UnsafeRawBufferPointer(start: params + r * size, count: size))
            })
            entries.append(.init(name: "\(name).loldu_z", dtype: dtype, shape: [r]) { out in
                out.copyMemory(from: UnsafeRawBufferPointer(start: params, count: r * size))
            })
            metadata["\(name).weight_fingerprint"] = adapter.weightFingerprint
            metadata["\(name).pivots_fingerprint"] = adapter.pivotsFingerprint
            layers.append((name, .object(Dictionary(uniqueKeysWithValues:
                [("dtype", JSON.string(adapter.dtype.name)), ("m", .number(adapter.m)), ("n", .number(adapter.n))]
                + configJSON(adapter.config)))))
        }
        var config: [(String, JSON)] = [("peft_type", .string("LOLDU"))]
        if let first = adapters.first { config += configJSON(first.config) }
        config += [
            ("target_modules", .array(names.map { .string($0) })),
            ("library", .string("loldu")), ("library_version", .string(libraryVersion)),
            ("layers", .object(Dictionary(uniqueKeysWithValues: layers))),
        ]
        try SafeTensors.write(entries, metadata: metadata, to: "\(directory)/\(modelFile)")
        try AtomicFile.write(to: "\(directory)/\(configFile)") { file throws(LoLDUError) in
            try file.write(Array((JSON.text(config) + "\n").utf8))
        }
    }

    /// Writes each adapter's current weight (and bias) as `NAME.weight` (`NAME.bias`).
    public static func exportMerged(_ adapters: [any AnyAdapter], names: [String], to path: String) throws(LoLDUError) {
        try validate(names: names)
        var entries: [SafeTensors.Entry] = []
        for (adapter, name) in zip(adapters, names) {
            let dtype = SafeTensors.name(of: adapter.dtype)
            entries.append(.init(name: "\(name).weight", dtype: dtype, shape: [adapter.m, adapter.n]) { out throws(LoLDUError) in
                try adapter.writeEffectiveWeight(out.baseAddress!)
            })
            if adapter.hasBias {
                entries.append(.init(name: "\(name).bias", dtype: dtype, shape: [adapter.m]) { out in
                    adapter.writeFactor(.bias, out.baseAddress!)
                })
            }
        }
        try SafeTensors.write(entries, metadata: ["format": "pt", "loldu.version": libraryVersion], to: path)
    }

    // MARK: Loading

    /// Reads and validates both files of a checkpoint directory.
    public init(directory: String) throws(LoLDUError) {
        let configPath = "\(directory)/\(Self.configFile)", modelPath = "\(directory)/\(Self.modelFile)"
        let configBytes = try AtomicFile.read(configPath, limit: Self.readLimit)
        let config = try rethrowing { try configBytes.withUnsafeBytes { raw in try JSON.parse(raw, what: configPath) } }
        let model = try SafeTensors.parse(try AtomicFile.read(modelPath, limit: Self.readLimit), what: modelPath)
        func fail(_ message: String) -> LoLDUError { LoLDUError(.format, "\(configPath): \(message)") }

        guard config["peft_type"]?.string == "LOLDU" else { throw fail("peft_type must be \"LOLDU\"") }
        guard let targets = config["target_modules"]?.array else { throw fail("target_modules must be a list of names") }
        guard let details = config["layers"]?.object else { throw fail("layers must be an object") }
        var names: [String] = []
        for target in targets {
            guard let name = target.string else { throw fail("target_modules must hold strings") }
            names.append(name)
        }
        do {
            try Self.validate(names: names)
        } catch {
            throw fail("target_modules: \(error.message)")
        }
        guard Set(names) == Set(details.keys) else { throw fail("target_modules and layers name different layers") }

        var layers: [Layer] = []
        var expectedTensors = Set<String>()
        for name in names {
            guard let layer = details[name]?.object else { throw fail("layers[\"\(name)\"] must be an object") }
            func field<V>(_ key: String, _ read: (JSON) -> V?) throws(LoLDUError) -> V {
                guard let value = layer[key].flatMap(read) else { throw fail("layers[\"\(name)\"].\(key) is missing or invalid") }
                return value
            }
            let dtypeName = try field("dtype") { $0.string }
            guard let dtype = [DType.float32, .float64].first(where: { $0.name == dtypeName }) else {
                throw fail("layers[\"\(name)\"].dtype must be \"float32\" or \"float64\"")
            }
            let m = try field("m") { $0.int }, n = try field("n") { $0.int }
            guard m >= 1, n >= 1, m <= Int(Int32.max), n <= Int(Int32.max) else { throw fail("layers[\"\(name)\"] has a bad shape") }
            var c = AdapterConfig()
            c.rank = try field("r") { $0.int }
            c.alpha = try field("alpha") { $0.double }
            let zInitName = try field("z_init") { $0.string }
            guard let zInit = ZInit.allCases.first(where: { $0.name == zInitName }) else {
                throw fail("layers[\"\(name)\"].z_init \"\(zInitName)\" is unknown")
            }
            c.zInit = zInit
            let residualName = try field("residual") { $0.string }
            guard let residual = [Residual.pivots, .initial].first(where: { $0.name == residualName }) else {
                throw fail("layers[\"\(name)\"].residual \"\(residualName)\" is unknown")
            }
            c.residual = residual
            c.trainSigma = try field("train_sigma") { $0.bool }
            c.seed = try field("seed") { json -> UInt64? in
                if case .number(let text) = json { return UInt64(text) }
                return nil
            }
            do {
                try c.validate(m: m, n: n)
            } catch {
                throw fail("layers[\"\(name)\"]: \(error.message)")
            }
            guard c.alpha > 0 else { throw fail("layers[\"\(name)\"].alpha must be > 0") }

            func hex(_ key: String) throws(LoLDUError) -> String {
                guard let value = model.metadata["\(name).\(key)"], value.count == 16,
                      value.allSatisfy({ $0.isHexDigit && !$0.isUppercase })
                else { throw model.fail("__metadata__ has no valid \"\(name).\(key)\"") }
                return value
            }
            let zName = "\(name).loldu_z", sigmaName = "\(name).loldu_sigma"
            expectedTensors.formUnion([zName, sigmaName])
            let z: [Double], sigma: Double
            switch dtype {
            case .float32:
                z = try model.values(zName, shape: [c.rank], as: Float.self).map(Double.init)
                sigma = Double(try model.values(sigmaName, shape: [1], as: Float.self)[0])
            case .float64:
                z = try model.values(zName, shape: [c.rank], as: Double.self)
                sigma = try model.values(sigmaName, shape: [1], as: Double.self)[0]
            }
            layers.append(Layer(name: name, dtype: dtype, m: m, n: n, config: c,
                                weightFingerprint: try hex("weight_fingerprint"),
                                pivotsFingerprint: try hex("pivots_fingerprint"), z: z, sigma: sigma))
        }
        if let extra = model.tensors.keys.sorted().first(where: { !expectedTensors.contains($0) }) {
            throw model.fail("unexpected tensor \"\(extra)\" (no such layer in \(Self.configFile))")
        }
        self.layers = layers
    }

    public func layer(_ name: String) throws(LoLDUError) -> Layer {
        guard let layer = layers.first(where: { $0.name == name }) else {
            throw LoLDUError(.mismatch, "the checkpoint has no layer named \"\(name)\"")
        }
        return layer
    }

    /// Checks that `adapter` is the one `name` was saved from (base weight, pivots, shape,
    /// configuration), then sets its `z` and `σ`.
    public func apply(_ name: String, to adapter: any AnyAdapter) throws(LoLDUError) {
        let layer = try layer(name)
        func mismatch(_ what: String) -> LoLDUError {
            LoLDUError(.mismatch, "layer \"\(name)\": \(what)")
        }
        guard adapter.dtype == layer.dtype else {
            throw mismatch("saved as \(layer.dtype.name), the adapter is \(adapter.dtype.name)")
        }
        guard adapter.m == layer.m, adapter.n == layer.n else {
            throw mismatch("saved on a \(layer.m) × \(layer.n) weight, the adapter's is \(adapter.m) × \(adapter.n)")
        }
        let mine = adapter.config, saved = layer.config
        for (field, same) in [
            ("rank", mine.rank == saved.rank), ("alpha", mine.effectiveAlpha == saved.effectiveAlpha),
            ("z_init", mine.zInit == saved.zInit), ("residual", mine.residual == saved.residual),
            ("seed", mine.seed == saved.seed), ("train_sigma", mine.trainSigma == saved.trainSigma),
        ] where !same {
            throw mismatch("saved with a different \(field); create the adapter with loldu_checkpoint_layer's config")
        }
        guard adapter.weightFingerprint == layer.weightFingerprint else {
            throw mismatch("the base weight differs from the one the checkpoint was saved on (fingerprint \(adapter.weightFingerprint), saved \(layer.weightFingerprint))")
        }
        guard adapter.pivotsFingerprint == layer.pivotsFingerprint else {
            throw mismatch("the LU pivots differ from the saved ones (another BLAS or machine?)")
        }
        try adapter.checkMutable("z")
        try adapter.setZ(values: layer.z)
        try adapter.setSigma(layer.sigma)
    }
}
