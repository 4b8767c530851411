import CLoLDU
import LoLDU

/// Argument checks shared by the thunks; each error names the argument and what was expected.
enum Check {
    static func nonNull<P>(_ pointer: P?, _ name: String) throws(LoLDUError) -> P {
        guard let pointer else { throw LoLDUError(.nullPointer, "\(name) is NULL") }
        return pointer
    }

    /// A buffer of a call: its address, its length in elements of `dtype`, its name.
    typealias Region = (pointer: UnsafeRawPointer?, count: Int, dtype: DType, name: String)

    /// Refuses an output that shares memory with another buffer of the same call: the kernels
    /// read their inputs after they start writing their outputs.
    static func disjoint(_ output: Region, from others: Region...) throws(LoLDUError) {
        guard let (a0, a1) = span(output) else { return }
        for other in others {
            guard let (b0, b1) = span(other), a0 < b1, b0 < a1 else { continue }
            throw overlap(output.name, other.name)
        }
    }

    /// Refuses gradient outputs of a grouped call (`grads[j]`: `count(j)` values of `dtype(j)`,
    /// named `name(j)` in a message) that share memory with each other or with `inputs`: sorted
    /// by address, `O(n log n)` integer work for thousands of buffers, names only on failure.
    static func disjoint(
        grads: [UnsafeMutableRawPointer?], count: (Int) -> Int, dtype: (Int) -> DType, name: (Int) -> String,
        from inputs: [Region]
    ) throws(LoLDUError) {
        let fixed = inputs.compactMap { r in span(r).map { (start: $0.0, end: $0.1, region: r) } }
        var spans: [(start: Int, end: Int, j: Int)] = []
        spans.reserveCapacity(grads.count)
        for (j, pointer) in grads.enumerated() {
            guard let (start, end) = span((UnsafeRawPointer(pointer), count(j), dtype(j), "")) else { continue }
            if let hit = fixed.first(where: { start < $0.end && $0.start < end }) {
                throw overlap(name(j), hit.region.name)
            }
            spans.append((start, end, j))
        }
        spans.sort { $0.start < $1.start }
        for (a, b) in zip(spans, spans.dropFirst()) where b.start < a.end {
            throw overlap(name(b.j), name(a.j))
        }
    }

    /// A region's bytes as addresses `start..<end` (saturated), or nil for NULL.
    private static func span(_ r: Region) -> (Int, Int)? {
        guard let p = r.pointer else { return nil }
        let (bytes, overflow) = r.count.multipliedReportingOverflow(by: r.dtype.byteSize)
        let start = Int(bitPattern: p)
        let (end, past) = start.addingReportingOverflow(overflow ? Int.max : bytes)
        return (start, past ? Int.max : end)
    }

    private static func overlap(_ output: String, _ other: String) -> LoLDUError {
        .invalid("\(output) overlaps \(other); an output must not share memory with another buffer of the call")
    }

    /// A non-null buffer of `dtype` elements, aligned for that type.
    static func buffer(_ pointer: UnsafeRawPointer?, _ name: String, _ dtype: DType) throws(LoLDUError) -> UnsafeRawPointer {
        let p = try nonNull(pointer, name)
        guard Int(bitPattern: p) % dtype.byteSize == 0 else {
            throw .invalid("\(name) must be aligned to \(dtype.byteSize) bytes for \(dtype.name)")
        }
        return p
    }

    static func mutableBuffer(_ pointer: UnsafeMutableRawPointer?, _ name: String, _ dtype: DType) throws(LoLDUError) -> UnsafeMutableRawPointer {
        UnsafeMutableRawPointer(mutating: try buffer(pointer, name, dtype))
    }

    /// NULL, or a buffer as ``buffer`` checks it.
    static func optionalBuffer(_ pointer: UnsafeRawPointer?, _ name: String, _ dtype: DType) throws(LoLDUError) -> UnsafeRawPointer? {
        guard let pointer else { return nil }
        return try buffer(pointer, name, dtype)
    }

    static func optionalBuffer(_ pointer: UnsafeMutableRawPointer?, _ name: String, _ dtype: DType) throws(LoLDUError) -> UnsafeMutableRawPointer? {
        try optionalBuffer(UnsafeRawPointer(pointer), name, dtype).map { UnsafeMutableRawPointer(mutating: $0) }
    }

    /// A size in `[minimum, 2³¹ − 1]` (BLAS integers are 32-bit).
    static func size(_ value: Int64, _ name: String, minimum: Int64) throws(LoLDUError) -> Int {
        guard value >= minimum, value <= Int64(Int32.max) else {
            throw .shape("\(name) must be in [\(minimum), \(Int32.max)], got \(value)")
        }
        return Int(value)
    }

    /// `rows × cols` elements of `dtype` must be addressable.
    static func extent(_ rows: Int, _ cols: Int, _ dtype: DType, _ what: String) throws(LoLDUError) {
        let (elements, o1) = rows.multipliedReportingOverflow(by: cols)
        let (_, o2) = elements.multipliedReportingOverflow(by: dtype.byteSize)
        guard !o1, !o2 else { throw .shape("\(what) of \(rows) × \(cols) elements is too large") }
    }

    static func dtype(_ raw: Int32) throws(LoLDUError) -> DType {
        guard let dtype = DType(rawValue: raw) else {
            throw .invalid("dtype must be LOLDU_FLOAT32 (1), LOLDU_FLOAT64 (2), LOLDU_BFLOAT16 (3) or LOLDU_FLOAT16 (4), got \(raw)")
        }
        return dtype
    }

    /// The loldu_backend value of a backend.
    static func backendCode(_ backend: GEMMBackend) -> Int32 {
        switch backend {
        case .openBLAS: 1  // LOLDU_BACKEND_OPENBLAS
        case .oneDNN: 2    // LOLDU_BACKEND_ONEDNN
        case .widened: 3   // LOLDU_BACKEND_WIDENED
        }
    }

    static func flag(_ raw: Int32, _ name: String) throws(LoLDUError) -> Bool {
        guard raw == 0 || raw == 1 else { throw .invalid("\(name) must be 0 or 1, got \(raw)") }
        return raw == 1
    }

    /// Reads `struct_size` first, so that a smaller struct is never read past its end.
    static func structSize<S>(_ pointer: UnsafePointer<S>, _ name: String) throws(LoLDUError) {
        let size = UnsafeRawPointer(pointer).load(as: UInt32.self)
        let expected = MemoryLayout<S>.size
        guard Int(size) == expected else {
            throw .invalid("\(name).struct_size must be sizeof(\(name == "config" ? "the config struct" : name)) = \(expected), got \(size); initialise it with its defaults function")
        }
    }

    static func config(_ pointer: UnsafePointer<loldu_config>) throws(LoLDUError) -> AdapterConfig {
        try structSize(pointer, "config")
        let c = pointer.pointee
        var config = AdapterConfig()
        guard let zInit = ZInit(rawValue: c.z_init) else {
            throw .invalid("config.z_init must be a loldu_z_init value in [0, 7], got \(c.z_init)")
        }
        guard let residual = Residual(rawValue: c.residual) else {
            throw .invalid("config.residual must be LOLDU_RESIDUAL_PIVOTS (0) or LOLDU_RESIDUAL_INIT (1), got \(c.residual)")
        }
        config.rank = Int(truncatingIfNeeded: c.rank)  // range checked by validate(m:n:)
        config.alpha = c.alpha
        config.zInit = zInit
        config.residual = residual
        config.seed = c.seed
        config.trainSigma = try flag(c.train_sigma, "config.train_sigma")
        config.borrowWeight = try flag(c.borrow_weight, "config.borrow_weight")
        return config
    }

    static func path(_ raw: Int32) throws(LoLDUError) -> ComputePath {
        guard let path = ComputePath(rawValue: raw) else {
            throw .invalid("path must be a loldu_path value in [0, 3], got \(raw)")
        }
        return path
    }
}

extension loldu_config {
    init(_ c: AdapterConfig) {
        self.init()
        struct_size = UInt32(MemoryLayout<loldu_config>.size)
        z_init = c.zInit.rawValue
        rank = Int64(c.rank)
        alpha = c.alpha
        seed = c.seed
        residual = c.residual.rawValue
        train_sigma = c.trainSigma ? 1 : 0
        borrow_weight = c.borrowWeight ? 1 : 0
    }
}
