import Glibc

/// Adapters written as a PEFT LoRA directory, exactly: every LoLDU adapter is a rank-`r` LoRA.
///
/// `ΔW = A diag(c) U_r` with `c = σ z − σ₀ z_ref`, so `lora_B = A diag(c)` (`m × r`) and
/// `lora_A = U_r` (`r × n`) with `lora_alpha = r` (scaling 1) give `W + ΔW` to the rounding of
/// one product per element, with no SVD. Layers of different ranks are padded with zeros to the
/// largest rank `R` (rows of `lora_A`, columns of `lora_B`): one `r` and one `lora_alpha` then
/// hold for every layer, which vLLM and llama.cpp (one global scaling) need.
///
/// - linear: `base_model.model.NAME.lora_A.weight` (`R × n`), `...lora_B.weight` (`m × R`);
/// - embedding (`W` is `num_embeddings × dim`, PEFT computes `ΔW = (B A)ᵀ`):
///   `...lora_embedding_A` = `(A diag(c))ᵀ` (`R × m`), `...lora_embedding_B` = `U_rᵀ` (`n × R`);
/// - convolution (`W` reshaped to `out × in·k…`): `lora_A.weight` = `U_r` as `R × in × k…`
///   (a convolution with the base's kernel, stride and padding), `lora_B.weight` = `A diag(c)` as
///   `out × R × 1…` (a 1×1 convolution). Exact for `groups = 1`, `dilation = 1` and zero
///   padding: PEFT's `lora_A` convolution has no dilation, and its `lora_B` groups differently.
public enum LoRAExport {
    public static let configFile = "adapter_config.json"
    public static let modelFile = "adapter_model.safetensors"
    /// What an earlier export may hold, and so what replacing it may delete.
    static let exportFiles: Set<String> = [configFile, modelFile, "README.md"]

    /// How PEFT represents a layer (C `loldu_lora_kind`).
    public enum Kind: Int32, Sendable {
        case linear = 0
        case embedding = 1
        case convolution = 2
    }

    public struct Layer: Sendable {
        public var kind: Kind
        /// A convolution's kernel size (1 to 3 dimensions); `n` must be `in_channels · ∏ kernel`.
        public var kernel: [Int]

        public init(kind: Kind = .linear, kernel: [Int] = []) {
            self.kind = kind
            self.kernel = kernel
        }
    }

    public struct Options: Sendable {
        /// `base_model_name_or_path` (a hub id or a directory), or nil.
        public var baseModel: String?
        /// The tensors' element type.
        public var dtype: DType = .float32
        /// Replace an existing export at the directory (only an export: a directory with other
        /// files is never deleted).
        public var replace = false

        public init() {}
    }

    /// Writes `adapters` under `names` (their module names in the model PEFT will load) into the
    /// new directory `directory`, atomically as a whole (see ``AtomicDirectory``).
    public static func write(_ adapters: [any AnyAdapter], names: [String], layers: [Layer], options: Options,
                             to directory: String) throws(LoLDUError) {
        try checkNewDirectoryName(directory, what: "dir")
        try checkTarget(directory, replace: options.replace)
        try Checkpoint.validate(names: names)
        for (adapter, name) in zip(adapters, names) {
            try Checkpoint.checkSavable(adapter, name, "an export")
            try checkFinite(adapter, name)
        }
        let rank = adapters.map(\.rank).max() ?? 1
        var entries: [SafeTensors.Entry] = []
        for ((adapter, name), layer) in zip(zip(adapters, names), layers) {
            entries += try tensors(adapter, name: name, layer: layer, rank: rank, dtype: options.dtype)
        }
        let config: JSON = .object([
            "alpha_pattern": .object([:]), "auto_mapping": .null,
            "base_model_name_or_path": options.baseModel.map { .string($0) } ?? .null,
            "bias": .string("none"), "fan_in_fan_out": .bool(false), "inference_mode": .bool(true),
            "init_lora_weights": .bool(true), "layers_pattern": .null, "layers_to_transform": .null,
            "lora_alpha": .number(rank), "lora_bias": .bool(false), "lora_dropout": .number("0.0"),
            "modules_to_save": .null, "peft_type": .string("LORA"), "r": .number(rank),
            "rank_pattern": .object([:]), "revision": .null,
            "target_modules": .array(names.sorted().map { .string($0) }), "task_type": .null,
            "use_dora": .bool(false), "use_rslora": .bool(false),
        ])
        let out = try AtomicDirectory(directory, what: "dir")
        try out.write(modelFile) { file throws(LoLDUError) in
            try SafeTensors.write(entries, metadata: ["format": "pt", "loldu.version": libraryVersion], to: file)
        }
        try out.write(configFile) { file throws(LoLDUError) in try file.write(Array((config.pretty() + "\n").utf8)) }
        try out.commit(replace: options.replace)
    }

    /// Refuses an existing `directory` unless `replace` and it holds an export and nothing else.
    static func checkTarget(_ directory: String, replace: Bool) throws(LoLDUError) {
        var info = stat()
        guard AtomicDirectory.exists(directory, &info) else { return }
        guard replace else {
            throw LoLDUError(.io, "\"\(directory)\" already exists; export into a new directory, or replace an earlier export")
        }
        guard (info.st_mode & S_IFMT) == S_IFDIR else {
            throw LoLDUError(.io, "\"\(directory)\" is \(AtomicFile.kind(info.st_mode)), not an earlier export")
        }
        for name in try AtomicFile.allEntries(of: directory) {
            guard exportFiles.contains(name) else {
                throw LoLDUError(.io, "\"\(directory)\" holds \"\(name)\", so it is not an earlier LoRA export; it is not replaced")
            }
            var entry = stat()
            guard lstat("\(directory)/\(name)", &entry) == 0, (entry.st_mode & S_IFMT) == S_IFREG else {
                throw LoLDUError(.io, "\"\(directory)/\(name)\" is \(AtomicFile.kind(entry.st_mode)), not a file an export writes; \"\(directory)\" is not replaced")
            }
        }
        let config = try AtomicFile.read("\(directory)/\(configFile)", limit: 1 << 24, missingOK: true)
        let json = try config.map { bytes throws(LoLDUError) in
            try rethrowing { try bytes.withUnsafeBytes { raw in try JSON.parse(raw, what: "\(directory)/\(configFile)") } }
        }
        guard json?["peft_type"]?.string == "LORA" else {
            throw LoLDUError(.io, "\"\(directory)\" has no LoRA \(configFile), so it is not an earlier export; it is not replaced")
        }
    }

    /// `notFinite` naming the layer unless `W + lora_B lora_A`, the weight PEFT computes with (or
    /// merges), is finite in the adapter's element type: the adapted weight the library merges
    /// (and refuses the same way).
    static func checkFinite(_ adapter: any AnyAdapter, _ name: String) throws(LoLDUError) {
        guard !adapter.effectiveWeightSurelyFits else { return }  // (the common case: no m × n buffer)
        let scratch = try HeapBuffer<UInt8>(count: adapter.m * adapter.n * adapter.dtype.byteSize)
        do {
            try adapter.writeEffectiveWeight(scratch.pointer)
        } catch where error.code == .notFinite {
            throw LoLDUError(.notFinite, "layer \"\(name)\": as a LoRA, W + lora_B lora_A would not be finite (\(error.message))")
        }
    }

    /// The two tensors of one layer, padded to `rank`.
    static func tensors(_ adapter: any AnyAdapter, name: String, layer: Layer, rank: Int, dtype: DType) throws(LoLDUError) -> [SafeTensors.Entry] {
        let (m, n, r) = (adapter.m, adapter.n, adapter.rank)
        let prefix = "base_model.model.\(name)."
        let type = SafeTensors.name(of: dtype)
        // A diag(c) (m × R) and U_r (R × n), in double: each product of two parameters is exact
        // there, so the one rounding is to `dtype`.
        let (lower, upper) = try factors(adapter)
        func scaled(_ i: Int, _ k: Int) -> Double { k < r ? lower.pointer[i * r + k] : 0 }
        func up(_ k: Int, _ j: Int) -> Double { k < r ? upper.pointer[k * n + j] : 0 }

        func entry(_ key: String, _ shape: [Int], _ value: @escaping (Int) -> Double) -> SafeTensors.Entry {
            .init(name: prefix + key, dtype: type, shape: shape) { out throws(LoLDUError) in
                let count = shape.reduce(1, *)
                let values = try HeapBuffer<Double>(count: count)
                for i in 0..<count { values.pointer[i] = value(i) }
                try convertElementsInRange(values.pointer, .float64, out.baseAddress!, dtype, count: count, what: prefix + key)
            }
        }
        switch layer.kind {
        case .linear:
            return [entry("lora_A.weight", [rank, n]) { up($0 / n, $0 % n) },
                    entry("lora_B.weight", [m, rank]) { scaled($0 / rank, $0 % rank) }]
        case .embedding:
            return [entry("lora_embedding_A", [rank, m]) { scaled($0 % m, $0 / m) },
                    entry("lora_embedding_B", [n, rank]) { up($0 % rank, $0 / rank) }]
        case .convolution:
            let kernel = layer.kernel
            // The product, stopped once it exceeds n (it must divide n): no overflow.
            var size = 1
            for k in kernel where size <= n { size = k >= 1 && k <= n ? size * k : n + 1 }
            guard (1...3).contains(kernel.count), kernel.allSatisfy({ $0 >= 1 }), size <= n, n % size == 0 else {
                throw .invalid("layer \"\(name)\": a convolution's kernel must have 1 to 3 sizes ≥ 1 whose product divides n = \(n), got \(kernel)")
            }
            let ones = [Int](repeating: 1, count: kernel.count)
            return [entry("lora_A.weight", [rank, n / size] + kernel) { up($0 / n, $0 % n) },
                    entry("lora_B.weight", [m, rank] + ones) { scaled($0 / rank, $0 % rank) }]
        }
    }

    /// `A diag(c)` (`m × r`) and `U_r` (`r × n`) of `adapter`, as doubles.
    /// (Buffers whose allocation may fail: the factors are as large as the layer.)
    static func factors(_ adapter: any AnyAdapter) throws(LoLDUError) -> (lower: HeapBuffer<Double>, upper: HeapBuffer<Double>) {
        let (m, n, r) = (adapter.m, adapter.n, adapter.rank)
        let type = adapter.dtype.parameterType
        func read(_ count: Int, _ body: (UnsafeMutableRawPointer) -> Void) throws(LoLDUError) -> HeapBuffer<Double> {
            let raw = try HeapBuffer<UInt8>(count: count * type.byteSize)
            let values = try HeapBuffer<Double>(count: count)
            withExtendedLifetime(raw) {
                body(UnsafeMutableRawPointer(raw.pointer))
                convertElements(UnsafeRawPointer(raw.pointer), type, values.pointer, .float64, count: count)
            }
            return values
        }
        let lower = try read(m * r) { adapter.writeFactor(.lower, $0) }
        let upper = try read(r * n) { adapter.writeFactor(.upper, $0) }
        let c = try read(r) { adapter.writeCoefficients($0) }
        for i in 0..<m {
            for k in 0..<r { lower.pointer[i * r + k] *= c[k] }
        }
        return (lower, upper)
    }
}
