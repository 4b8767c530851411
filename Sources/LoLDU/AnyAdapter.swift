/// An ``Adapter`` of either element type, behind untyped pointers: what a C handle points to.
///
/// Every raw pointer refers to elements of ``dtype``; the caller (the C ABI layer) has already
/// checked that they are non-null where required and aligned for that type.
public protocol AnyAdapter: AnyObject, Sendable {
    var dtype: DType { get }
    var m: Int { get }
    var n: Int { get }
    var rank: Int { get }
    var config: AdapterConfig { get }
    var hasBias: Bool { get }
    var enabled: Bool { get }
    var merged: Bool { get }
    var path: ComputePath { get set }
    var trainableCount: Int { get }
    var degeneratePivots: Int { get }
    var sigmaValue: Double { get }
    /// `z` (`rank` values) then `σ`, at a fixed address for the adapter's lifetime.
    var paramsPointer: UnsafeMutableRawPointer { get }
    /// `dz` then `dσ`, at a fixed address.
    var gradsPointer: UnsafeMutableRawPointer { get }
    var biasGradPointer: UnsafeMutableRawPointer? { get }
    var memory: (weight: Int, factors: Int, state: Int, mergedCache: Int, scratch: Int) { get }

    func forward(batch: Int, x: UnsafeRawPointer, y: UnsafeMutableRawPointer, h: UnsafeMutableRawPointer?) throws(LoLDUError)
    func backward(batch: Int, x: UnsafeRawPointer, dy: UnsafeRawPointer, dx: UnsafeMutableRawPointer?, h: UnsafeRawPointer?) throws(LoLDUError)
    func weightBackward(rawPointer dw: UnsafeRawPointer) throws(LoLDUError)
    func writeEffectiveWeight(_ out: UnsafeMutableRawPointer) throws(LoLDUError)
    func writeResidual(_ out: UnsafeMutableRawPointer) throws(LoLDUError)
    func writeFactor(_ factor: Factor, _ out: UnsafeMutableRawPointer)
    func writePivots(_ out: UnsafeMutablePointer<Int32>)
    func setZ(rawPointer z: UnsafeRawPointer) throws(LoLDUError)
    func setSigma(_ value: Double) throws(LoLDUError)
    func plan(batch: Int, keepsH: Bool) -> ComputePath
    func zeroGrad()
    func merge() throws(LoLDUError)
    func unmerge()
    func setEnabled(_ on: Bool)
    func cloneAdapter() throws(LoLDUError) -> any AnyAdapter
    func checkMutable(_ what: String) throws(LoLDUError)
    /// Sets `z` (`rank` values) and `σ`, rounded to the element type, both or neither.
    func setParameters(z: [Double], sigma: Double) throws(LoLDUError)
    /// The first trainable value that is not finite (`"z[k]"`, `"sigma"`), if any.
    var firstNonFiniteParameter: String? { get }
    /// ``fingerprint(_:)`` of the base weight's bytes, and of the pivots.
    var weightFingerprint: String { get }
    var pivotsFingerprint: String { get }
}

/// The frozen factors a caller can read.
public enum Factor: Sendable {
    case lower      // A = P L_r, m × r
    case diagonal   // D_r, r
    case upper      // U_r, r × n
    case weight     // the pretrained W, m × n
    case bias       // b, m
}

/// Creates an adapter of the given element type from a weight of that type.
public func makeAdapter(
    dtype: DType, m: Int, n: Int, weight: UnsafeRawPointer, bias: UnsafeRawPointer?, config: AdapterConfig
) throws(LoLDUError) -> any AnyAdapter {
    switch dtype {
    case .float32:
        try Adapter<Float>(m: m, n: n, weight: weight.assumingMemoryBound(to: Float.self),
                           bias: bias?.assumingMemoryBound(to: Float.self), config: config)
    case .float64:
        try Adapter<Double>(m: m, n: n, weight: weight.assumingMemoryBound(to: Double.self),
                            bias: bias?.assumingMemoryBound(to: Double.self), config: config)
    }
}

extension Adapter: AnyAdapter {
    public var dtype: DType { T.dtype }
    public var hasBias: Bool { factors.bias != nil }
    public var degeneratePivots: Int { factors.degeneratePivots }
    public var sigmaValue: Double { Double(sigma) }
    public var paramsPointer: UnsafeMutableRawPointer { UnsafeMutableRawPointer(params.pointer) }
    public var gradsPointer: UnsafeMutableRawPointer { UnsafeMutableRawPointer(grads.pointer) }
    public var biasGradPointer: UnsafeMutableRawPointer? { biasGrad.map { UnsafeMutableRawPointer($0.pointer) } }

    public func forward(batch: Int, x: UnsafeRawPointer, y: UnsafeMutableRawPointer, h: UnsafeMutableRawPointer?) throws(LoLDUError) {
        try forward(batch: batch, x: x.assumingMemoryBound(to: T.self), y: y.assumingMemoryBound(to: T.self),
                    h: h?.assumingMemoryBound(to: T.self))
    }

    public func backward(batch: Int, x: UnsafeRawPointer, dy: UnsafeRawPointer, dx: UnsafeMutableRawPointer?, h: UnsafeRawPointer?) throws(LoLDUError) {
        try backward(batch: batch, x: x.assumingMemoryBound(to: T.self), dy: dy.assumingMemoryBound(to: T.self),
                     dx: dx?.assumingMemoryBound(to: T.self), h: h?.assumingMemoryBound(to: T.self))
    }

    public func weightBackward(rawPointer dw: UnsafeRawPointer) throws(LoLDUError) {
        try weightBackward(dw.assumingMemoryBound(to: T.self))
    }

    public func writeEffectiveWeight(_ out: UnsafeMutableRawPointer) throws(LoLDUError) {
        try writeEffectiveWeight(out.assumingMemoryBound(to: T.self))
    }

    public func writeResidual(_ out: UnsafeMutableRawPointer) throws(LoLDUError) {
        try writeResidual(out.assumingMemoryBound(to: T.self))
    }

    public func writeFactor(_ factor: Factor, _ out: UnsafeMutableRawPointer) {
        let o = out.assumingMemoryBound(to: T.self)
        switch factor {
        case .lower: o.update(from: factors.lower.pointer, count: m * rank)
        case .upper: o.update(from: factors.upper.pointer, count: rank * n)
        case .weight: o.update(from: factors.weight, count: m * n)
        case .diagonal: factors.diagonal.withUnsafeBufferPointer { o.update(from: $0.baseAddress!, count: rank) }
        case .bias: if let b = factors.bias { o.update(from: b.pointer, count: m) }
        }
    }

    public func writePivots(_ out: UnsafeMutablePointer<Int32>) {
        factors.pivots.withUnsafeBufferPointer { out.update(from: $0.baseAddress!, count: rank) }
    }

    public func setZ(rawPointer z: UnsafeRawPointer) throws(LoLDUError) {
        try setZ(z.assumingMemoryBound(to: T.self))
    }

    public func setSigma(_ value: Double) throws(LoLDUError) {
        try setSigma(T(value))
    }

    public func cloneAdapter() throws(LoLDUError) -> any AnyAdapter { try clone() }

    public func setParameters(z values: [Double], sigma: Double) throws(LoLDUError) {
        let z = values.map { T($0) }
        try z.withUnsafeBufferPointer { buffer throws(LoLDUError) in try setParameters(z: buffer.baseAddress!, sigma: T(sigma)) }
    }

    public var weightFingerprint: String {
        fingerprint(UnsafeRawBufferPointer(start: factors.weight, count: m * n * MemoryLayout<T>.stride))
    }

    public var pivotsFingerprint: String {
        factors.pivots.withUnsafeBytes { fingerprint($0) }
    }
}
