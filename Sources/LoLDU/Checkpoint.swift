import Glibc

/// Adapter checkpoints: a directory like PEFT's `save_pretrained`.
///
/// - `adapter_model.safetensors`: per layer `NAME.loldu_z` (`r`) and `NAME.loldu_sigma` (`1`)
///   in the parameter type (float32, float64 for float64 adapters); `__metadata__` holds
///   `NAME.weight_fingerprint` and `NAME.pivots_fingerprint` (see ``fingerprint(_:)``), `format`
///   and the library version.
/// - `adapter_config.json`: the shared settings at the top level (from the first layer), the
///   layer names in `target_modules`, and every layer's dtype, shape and configuration in
///   `layers`.
///
/// Loading re-derives the frozen factors from the base weight (the caller creates the adapter
/// with ``Checkpoint/Layer/config``), checks the fingerprints, and sets `z` and `σ`.
///
/// A save is atomic as a whole: both files carry the same random `generation`, and the new
/// config is first written beside the old one as `.adapter_config.json.pending`; then the model
/// file and the config are renamed into place, one after the other, under an exclusive lock of
/// the directory. Whenever a save is interrupted, the directory holds either the old pair, or
/// the new model file with the new config still pending; the reader takes the config whose
/// generation matches the model file's, so it loads exactly the old or exactly the new
/// checkpoint. The next save completes or discards what an interrupted one left.
public final class Checkpoint: @unchecked Sendable {
    public static let modelFile = "adapter_model.safetensors"
    public static let configFile = "adapter_config.json"
    /// The new config of a save in progress (or interrupted between its two renames).
    static let pendingFile = ".adapter_config.json.pending"
    static let generationKey = "loldu.generation"
    /// The largest checkpoint file read (both files hold a few bytes per layer).
    static let readLimit = 1 << 30

    public struct Layer: Sendable {
        public let name: String
        public let dtype: DType
        public let m: Int
        public let n: Int
        public let config: AdapterConfig
        public let weightFingerprint: String
        public let pivotsFingerprint: String
        public let z: HeapBuffer<Double>
        public let sigma: Double
    }

    /// Layers in saved order.
    public let layers: [Layer]
    /// Each layer's place in ``layers`` (a checkpoint may hold many: a look-up is not a search).
    private let index: [String: Int]

    // MARK: Saving

    /// Checks that layer names are usable as tensor-name prefixes and all different.
    public static func validate(names: [String]) throws(LoLDUError) {
        var seen = Set<String>()
        for (i, name) in names.enumerated() {
            guard !name.isEmpty, name.utf8.count <= 512 else {
                throw .invalid("names[\(i)] must be 1 to 512 bytes long, got \(name.utf8.count)")
            }
            guard !name.containsControlCharacter else {
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

    /// Refuses an adapter whose values are not what a file of `what` may hold: not finite, or
    /// written while merged (the layer computes with the merged values).
    static func checkSavable(_ adapter: any AnyAdapter, _ name: String, _ what: String) throws(LoLDUError) {
        if let bad = adapter.firstNonFiniteParameter {
            throw LoLDUError(.notFinite, "layer \"\(name)\": \(bad) is not finite; \(what) holds finite values only")
        }
        if adapter.changedWhileMerged {
            throw .state("layer \"\(name)\": z or sigma were written while the adapter is merged (through memory taken before the merge), so they are not what it computes with; unmerge it, set the values meant, and merge again")
        }
    }

    /// Saves adapters under names into `directory`, atomically as a whole (see the type).
    public static func save(_ adapters: [any AnyAdapter], names: [String], to directory: String) throws(LoLDUError) {
        try validate(names: names)
        for (adapter, name) in zip(adapters, names) {
            try checkSavable(adapter, name, "a checkpoint")
        }
        let generation = randomGeneration()
        var metadata = ["format": "pt", "loldu.version": libraryVersion, generationKey: generation]
        var entries: [SafeTensors.Entry] = []
        var layers: [(String, JSON)] = []
        for (adapter, name) in zip(adapters, names) {
            let parameters = adapter.dtype.parameterType
            let (r, size, dtype) = (adapter.rank, parameters.byteSize, SafeTensors.name(of: parameters))
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
            ("generation", .string(generation)),
            ("layers", .object(Dictionary(uniqueKeysWithValues: layers))),
        ]

        let dir = try AtomicFile.LockedDirectory(directory, exclusive: true, create: true)
        finishInterruptedSave(dir)
        var model: String? = nil, wrotePending = false
        do {
            for name in [modelFile, configFile] {  // (refused before the first rename: a failed save changes nothing)
                _ = try AtomicFile.replaceable(dir.file(name), followLinks: false)
            }
            let prepared = try dir.prepare(modelFile) { file throws(LoLDUError) in
                try SafeTensors.write(entries, metadata: metadata, to: file)
            }
            model = prepared
            try dir.replace(pendingFile) { file throws(LoLDUError) in try file.write(Array((JSON.text(config) + "\n").utf8)) }
            wrotePending = true
            try dir.commit(prepared, as: modelFile)
        } catch {
            if let model { unlink(model) }  // (not renamed into place)
            if wrotePending { unlink(dir.file(pendingFile)) }  // (this save's, which never took effect)
            if dir.created { rmdir(directory) }  // (a directory this save made, left empty)
            throw error
        }
        // From here the directory loads as the new checkpoint, with or without this rename.
        try dir.commit(dir.file(pendingFile), as: configFile, removeOnFailure: false)
    }

    /// Under the save lock: completes a save interrupted between its two renames (the pending
    /// config matches the model file), or removes a pending config that never took effect, and
    /// the temporary files of killed writers.
    static func finishInterruptedSave(_ dir: AtomicFile.LockedDirectory) {
        dir.removeStaleTemporaries(of: [modelFile, configFile, pendingFile])
        let pending = dir.file(pendingFile)
        guard let pendingBytes = try? AtomicFile.read(pending, limit: readLimit, missingOK: true) else {
            unlink(pending)  // not a regular file, or unreadable
            return
        }
        if let model = try? modelGeneration(dir.file(modelFile)), model == (try? configGeneration(pendingBytes, what: pending)) {
            _ = try? dir.commit(pending, as: configFile, removeOnFailure: false)
        } else {
            unlink(pending)
        }
    }

    /// 128 random bits as 32 hex digits: one per save, written into both files.
    static func randomGeneration() -> String {
        var system = SystemRandomNumberGenerator()
        return [system.next(), system.next()].map { (word: UInt64) in
            let hex = String(word, radix: 16)
            return String(repeating: "0", count: 16 - hex.count) + hex
        }.joined()
    }

    /// The generation written in a model file's header (`nil` for files written without one).
    static func modelGeneration(_ path: String) throws(LoLDUError) -> String? {
        try SafeTensors.parse(try AtomicFile.read(path, limit: readLimit), what: path).metadata[generationKey]
    }

    static func configGeneration(_ bytes: FileBytes, what: String) throws(LoLDUError) -> String? {
        try rethrowing { try bytes.withUnsafeBytes { raw in try JSON.parse(raw, what: what) } }["generation"]?.string
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

    /// Reads and validates both files of a checkpoint directory (the config whose generation
    /// matches the model file's; see the type).
    public init(directory: String) throws(LoLDUError) {
        let dir = try AtomicFile.LockedDirectory(directory, exclusive: false)
        let modelPath = dir.file(Self.modelFile)
        let model = try SafeTensors.parse(try AtomicFile.read(modelPath, limit: Self.readLimit), what: modelPath)
        let generation = model.metadata[Self.generationKey]
        var configPath = dir.file(Self.configFile)
        var configBytes = try AtomicFile.read(configPath, limit: Self.readLimit, missingOK: generation != nil)
        var config = try configBytes.map { bytes throws(LoLDUError) in
            try rethrowing { try bytes.withUnsafeBytes { raw in try JSON.parse(raw, what: configPath) } }
        }
        if let generation, config?["generation"]?.string != generation {
            // The save that wrote the model file was interrupted before its config took its place.
            let pendingPath = dir.file(Self.pendingFile)
            let pendingBytes = try? AtomicFile.read(pendingPath, limit: Self.readLimit, missingOK: true)
            if let pendingBytes, let pending = try? rethrowing({ try pendingBytes.withUnsafeBytes { raw in try JSON.parse(raw, what: pendingPath) } }),
               pending["generation"]?.string == generation {
                (configPath, configBytes, config) = (pendingPath, pendingBytes, pending)
            } else if config == nil {
                throw LoLDUError(.io, "cannot open \"\(configPath)\": No such file or directory")
            } else if config?["peft_type"]?.string == "LOLDU" {  // (another tool's config: said below)
                throw LoLDUError(.format, "\(configPath) (generation \(config?["generation"]?.string ?? "none")) and \(modelPath) (generation \(generation)) come from different saves, and no pending config matches; save the checkpoint again")
            }
        }
        guard let config else { throw LoLDUError(.io, "cannot open \"\(configPath)\": No such file or directory") }
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
            guard let dtype = DType.allCases.first(where: { $0.name == dtypeName }) else {
                throw fail("layers[\"\(name)\"].dtype must be one of \(DType.allCases.map(\.name)), got \"\(dtypeName)\"")
            }
            let m = try field("m") { $0.int }, n = try field("n") { $0.int }
            guard m >= 1, n >= 1, m <= Int(Int32.max), n <= Int(Int32.max) else { throw fail("layers[\"\(name)\"] has a bad shape") }
            var c = AdapterConfig()
            c.rank = try field("r") { $0.int }
            guard c.rank >= 1 else { throw fail("layers[\"\(name)\"].r must be >= 1, got \(c.rank)") }
            c.alpha = try field("alpha") { $0.double }
            let zInitName = try field("z_init") { $0.string }
            guard let zInit = ZInit.allCases.first(where: { $0.name == zInitName }) else {
                throw fail("layers[\"\(name)\"].z_init \"\(zInitName)\" is unknown")
            }
            c.zInit = zInit
            let residualName = try field("residual") { $0.string }
            guard let residual = Residual.allCases.first(where: { $0.name == residualName }) else {
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
            if let why = c.unusableSigma(as: dtype.parameterType) { throw fail("layers[\"\(name)\"].\(why)") }

            func hex(_ key: String) throws(LoLDUError) -> String {
                guard let value = model.metadata["\(name).\(key)"], value.utf8.count == 16,
                      value.utf8.allSatisfy({ (UInt8(ascii: "0")...UInt8(ascii: "9")).contains($0) || (UInt8(ascii: "a")...UInt8(ascii: "f")).contains($0) })
                else { throw model.fail("__metadata__ has no valid \"\(name).\(key)\"") }
                return value
            }
            let zName = "\(name).loldu_z", sigmaName = "\(name).loldu_sigma"
            expectedTensors.formUnion([zName, sigmaName])
            // (z and σ are in the parameter type)
            let z = try model.values(zName, shape: [c.rank], as: dtype.parameterType)
            let sigma = try model.values(sigmaName, shape: [1], as: dtype.parameterType)[0]
            layers.append(Layer(name: name, dtype: dtype, m: m, n: n, config: c,
                                weightFingerprint: try hex("weight_fingerprint"),
                                pivotsFingerprint: try hex("pivots_fingerprint"), z: z, sigma: sigma))
        }
        if let extra = model.tensors.keys.sorted().first(where: { !expectedTensors.contains($0) }) {
            throw model.fail("unexpected tensor \"\(extra)\" (no such layer in \(Self.configFile))")
        }
        self.layers = layers
        index = Dictionary(uniqueKeysWithValues: layers.enumerated().map { ($0.element.name, $0.offset) })
    }

    public func layer(_ name: String) throws(LoLDUError) -> Layer {
        guard let i = index[name] else {
            throw LoLDUError(.mismatch, "the checkpoint has no layer named \"\(name)\"")
        }
        return layers[i]
    }

    /// What to check when a base weight's fingerprint is not the saved one.
    static func baseHint(saved: DType, base: DType) -> String {
        guard saved != base else { return "is this the base model the adapter was trained on?" }
        return "the checkpoint was saved on a \(saved.name) weight and this one is \(base.name): rounded to another type, a weight is another weight unless every value survives the rounding (a checkpoint saved on a half-precision base always applies to its float32 copy); use the base the adapter was trained on"
    }

    /// Checks that `adapter` is the one `name` was saved from (base weight, pivots, shape,
    /// configuration), then sets its `z` and `σ`.
    public func apply(_ name: String, to adapter: any AnyAdapter) throws(LoLDUError) {
        let layer = try layer(name)
        func mismatch(_ what: String) -> LoLDUError {
            LoLDUError(.mismatch, "layer \"\(name)\": \(what)")
        }
        // A bf16 model and its float32 copy have the same values, pivots and fingerprints: a
        // checkpoint saved on one applies to the other. float64 parameters are another type.
        guard adapter.dtype.parameterType == layer.dtype.parameterType else {
            throw mismatch("saved as \(layer.dtype.name), the adapter is \(adapter.dtype.name) (parameters in \(layer.dtype.parameterType.name) and \(adapter.dtype.parameterType.name))")
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
            throw mismatch("the base weight differs from the one the checkpoint was saved on (fingerprint \(adapter.weightFingerprint), saved \(layer.weightFingerprint)); \(Self.baseHint(saved: layer.dtype, base: adapter.dtype))")
        }
        guard adapter.pivotsFingerprint == layer.pivotsFingerprint else {
            throw mismatch("the LU pivots differ from the saved ones (another BLAS or machine?)")
        }
        try adapter.setParameters(z: layer.z, sigma: layer.sigma)
    }
}
