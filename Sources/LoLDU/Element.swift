/// The element types of weights and activations, and their conversions to the type the library
/// computes and trains in (`Compute`: `Float` for float32, bfloat16 and float16; `Double` for
/// float64). Parameters (`z`, `σ`), gradients, optimiser state and GEMM accumulation are in
/// `Compute`; a half-precision weight or activation is widened exactly and results are rounded
/// back once, to nearest even.
public protocol Element: BitwiseCopyable, Sendable {
    associatedtype Compute: BLASScalar & GEMMOperand where Compute.Compute == Compute
    static var dtype: DType { get }

    /// `dst[i] = Compute(src[i])`, exactly.
    static func widen(_ src: UnsafePointer<Self>, to dst: UnsafeMutablePointer<Compute>, count: Int)
    /// `dst[i] = src[i]` rounded to nearest even (overflow gives ±Inf, NaN stays NaN).
    static func narrow(_ src: UnsafePointer<Compute>, to dst: UnsafeMutablePointer<Self>, count: Int)
    /// Whether every element is finite, copying them to `destination` in the same pass when given.
    static func allFinite(_ x: UnsafePointer<Self>, count: Int, copyingTo destination: UnsafeMutablePointer<Self>?) -> Bool
}

extension Element {
    /// One value, widened.
    @inline(__always)
    static func wide(_ value: Self) -> Compute {
        withUnsafePointer(to: value) { p in
            var out: Compute = 0
            widen(p, to: &out, count: 1)
            return out
        }
    }

    /// Whether the element type is its own compute type (float32, float64): no conversions.
    static var computesInPlace: Bool { Self.self == Compute.self }
}

/// A type that is its own compute type: widening and narrowing are copies (none in place), of
/// raw bytes so that no generic code copies element by element.
extension Element where Compute == Self {
    public static func widen(_ src: UnsafePointer<Self>, to dst: UnsafeMutablePointer<Self>, count: Int) {
        copy(src, to: dst, count: count)
    }
    public static func narrow(_ src: UnsafePointer<Self>, to dst: UnsafeMutablePointer<Self>, count: Int) {
        copy(src, to: dst, count: count)
    }
    @inline(__always)
    private static func copy(_ src: UnsafePointer<Self>, to dst: UnsafeMutablePointer<Self>, count: Int) {
        guard src != UnsafePointer(dst) else { return }
        UnsafeMutableRawPointer(dst).copyMemory(from: src, byteCount: count * MemoryLayout<Self>.stride)
    }
}

extension Float: Element { public typealias Compute = Float }

extension Double: Element { public typealias Compute = Double }

/// bfloat16: the top half of a float32 (1 sign, 8 exponent, 7 mantissa bits), as PyTorch's
/// `torch.bfloat16` and numpy's `ml_dtypes.bfloat16`.
struct BFloat16: Element, Equatable {
    typealias Compute = Float
    var bits: UInt16

    init(bits: UInt16) { self.bits = bits }

    static var dtype: DType { .bfloat16 }

    static func widen(_ src: UnsafePointer<BFloat16>, to dst: UnsafeMutablePointer<Float>, count: Int) {
        let s = UnsafeRawPointer(src).assumingMemoryBound(to: UInt16.self)
        let d = UnsafeMutableRawPointer(dst).assumingMemoryBound(to: UInt32.self)
        for i in 0..<count { d[i] = UInt32(s[i]) << 16 }
    }

    /// Round to nearest even on the 16 discarded bits; NaN is kept a (quiet) NaN.
    static func narrow(_ src: UnsafePointer<Float>, to dst: UnsafeMutablePointer<BFloat16>, count: Int) {
        let s = UnsafeRawPointer(src).assumingMemoryBound(to: UInt32.self)
        let d = UnsafeMutableRawPointer(dst).assumingMemoryBound(to: UInt16.self)
        for i in 0..<count {
            let u = s[i]
            let rounded = (u &+ 0x7FFF &+ ((u >> 16) & 1)) >> 16
            let nan = (u & 0x7FFF_FFFF) > 0x7F80_0000
            d[i] = UInt16(truncatingIfNeeded: nan ? (u >> 16) | 0x40 : rounded)
        }
    }

    static func allFinite(_ x: UnsafePointer<BFloat16>, count: Int, copyingTo destination: UnsafeMutablePointer<BFloat16>?) -> Bool {
        allFiniteBits(x, count: count, copyingTo: destination.map { UnsafeMutableRawPointer($0) },
                      exponentLowBit: UInt16(1) << 7, UInt16.self)
    }
}

/// IEEE binary16, as `torch.float16` and `numpy.float16`. Conversions are written with integer
/// operations (no F16C instructions needed), so they vectorise on any x86-64.
extension Float16: Element {
    public typealias Compute = Float
    public static var dtype: DType { .float16 }

    /// Exact: the 15 magnitude bits shifted into a float32 pattern whose exponent is off by
    /// 127 − 15, fixed by one multiplication by 2¹¹² (which also normalises subnormals);
    /// Inf and NaN get the all-ones float32 exponent instead.
    public static func widen(_ src: UnsafePointer<Float16>, to dst: UnsafeMutablePointer<Float>, count: Int) {
        let s = UnsafeRawPointer(src).assumingMemoryBound(to: UInt16.self)
        let d = UnsafeMutableRawPointer(dst).assumingMemoryBound(to: UInt32.self)
        for i in 0..<count {
            let h = UInt32(s[i])
            let magnitude = h & 0x7FFF
            let scaled = (Float(bitPattern: magnitude << 13) * 0x1p112).bitPattern
            let special = (magnitude << 13) | 0x7F80_0000
            d[i] = (magnitude >= 0x7C00 ? special : scaled) | ((h & 0x8000) << 16)
        }
    }

    /// Round to nearest even. Normal results: rebias the exponent and round on the 13 dropped
    /// bits; subnormal results: one float32 addition of 0.5 (in the 2⁻²⁴ scale of float16's
    /// smallest subnormal), which rounds to nearest even in hardware; overflow gives ±Inf.
    public static func narrow(_ src: UnsafePointer<Float>, to dst: UnsafeMutablePointer<Float16>, count: Int) {
        let s = UnsafeRawPointer(src).assumingMemoryBound(to: UInt32.self)
        let d = UnsafeMutableRawPointer(dst).assumingMemoryBound(to: UInt16.self)
        for i in 0..<count {
            let u = s[i]
            let sign = (u >> 16) & 0x8000
            let a = u & 0x7FFF_FFFF
            // Normal: exponent 127 → 15 (subtract 112 << 23), then round half to even.
            let normal = (a &- (112 << 23) &+ 0xFFF &+ ((a >> 13) & 1)) >> 13
            // Subnormal (|x| < 2⁻¹⁴): add 2⁻¹, in units where float16's 2⁻²⁴ is 1.
            let subnormal = (Float(bitPattern: a) + 0.5).bitPattern &- Float(0.5).bitPattern
            let finite = a < 0x3880_0000 ? subnormal : Swift.min(normal, 0x7C00)
            let special: UInt32 = a > 0x7F80_0000 ? 0x7E00 : 0x7C00
            d[i] = UInt16(truncatingIfNeeded: (a >= 0x4780_0000 ? special : finite) | sign)
        }
    }

    public static func allFinite(_ x: UnsafePointer<Float16>, count: Int, copyingTo destination: UnsafeMutablePointer<Float16>?) -> Bool {
        allFiniteBits(x, count: count, copyingTo: destination.map { UnsafeMutableRawPointer($0) },
                      exponentLowBit: UInt16(1) << 10, UInt16.self)
    }
}

/// Converts `count` elements of type `from` at `src` to type `to` at `dst`: exact when widening,
/// one rounding to nearest even when narrowing (float64 to a half type through float32 rounded
/// to odd, which keeps it one rounding).
func convertElements(_ src: UnsafeRawPointer, _ from: DType, _ dst: UnsafeMutableRawPointer, _ to: DType, count: Int) {
    if from == to {
        dst.copyMemory(from: src, byteCount: count * from.byteSize)
        return
    }
    switch (from, to) {
    case (.float32, _): narrowFloats(src.assumingMemoryBound(to: Float.self), to: dst, to, count: count)
    case (_, .float32): widenToFloats(src, from, dst.assumingMemoryBound(to: Float.self), count: count)
    default:
        withUnsafeTemporaryAllocation(of: Float.self, capacity: 4096) { chunk in
            for start in stride(from: 0, to: count, by: 4096) {
                let n = Swift.min(4096, count - start)
                switch from {
                case .float64: roundToOddFloats((src + start * from.byteSize).assumingMemoryBound(to: Double.self), chunk.baseAddress!, count: n)
                default: widenToFloats(src + start * from.byteSize, from, chunk.baseAddress!, count: n)
                }
                narrowFloats(chunk.baseAddress!, to: dst + start * to.byteSize, to, count: n)
            }
        }
    }
}

/// ``convertElements(_:_:_:_:count:)``, refusing (`notFinite`, naming `what`) a finite value
/// that the conversion turns into ±Inf: one beyond the range of `to` (float16 ends at 65504).
/// `first`: the index of `src`'s first element in what `what` names, for the message.
func convertElementsInRange(_ src: UnsafeRawPointer, _ from: DType, _ dst: UnsafeMutableRawPointer, _ to: DType,
                            count: Int, what: String, first: Int = 0) throws(LoLDUError) {
    convertElements(src, from, dst, to, count: count)
    guard !allFinite(dst, to, count: count) else { return }
    for j in 0..<count where element(src, from, j).isFinite && !element(dst, to, j).isFinite {
        throw LoLDUError(.notFinite, "\(what): element \(first + j) = \(element(src, from, j)) is beyond the range of \(to.name)")
    }
}

/// Whether `count` elements of type `dtype` at `x` are all finite.
func allFinite(_ x: UnsafeRawPointer, _ dtype: DType, count: Int) -> Bool {
    switch dtype {
    case .float32: Float.allFinite(x.assumingMemoryBound(to: Float.self), count: count, copyingTo: nil)
    case .float64: Double.allFinite(x.assumingMemoryBound(to: Double.self), count: count, copyingTo: nil)
    case .bfloat16: BFloat16.allFinite(x.assumingMemoryBound(to: BFloat16.self), count: count, copyingTo: nil)
    case .float16: Float16.allFinite(x.assumingMemoryBound(to: Float16.self), count: count, copyingTo: nil)
    }
}

/// Element `j` of an array of type `dtype`, as a double (for messages).
private func element(_ x: UnsafeRawPointer, _ dtype: DType, _ j: Int) -> Double {
    switch dtype {
    case .float32: Double(x.assumingMemoryBound(to: Float.self)[j])
    case .float64: x.assumingMemoryBound(to: Double.self)[j]
    case .bfloat16: Double(BFloat16.wide(x.assumingMemoryBound(to: BFloat16.self)[j]))
    case .float16: Double(x.assumingMemoryBound(to: Float16.self)[j])
    }
}

private func widenToFloats(_ src: UnsafeRawPointer, _ from: DType, _ dst: UnsafeMutablePointer<Float>, count: Int) {
    switch from {
    case .float32: dst.update(from: src.assumingMemoryBound(to: Float.self), count: count)
    case .bfloat16: BFloat16.widen(src.assumingMemoryBound(to: BFloat16.self), to: dst, count: count)
    case .float16: Float16.widen(src.assumingMemoryBound(to: Float16.self), to: dst, count: count)
    case .float64:
        let s = src.assumingMemoryBound(to: Double.self)
        for i in 0..<count { dst[i] = Float(s[i]) }
    }
}

/// float64 to float32 rounded to odd: toward zero, then the last bit set if that was inexact.
/// Rounded again to nearest even into a type of at most 22 significant bits (float16, bfloat16),
/// the result is the one correctly rounded from the double, as if rounded once.
private func roundToOddFloats(_ src: UnsafePointer<Double>, _ dst: UnsafeMutablePointer<Float>, count: Int) {
    for i in 0..<count {
        let x = src[i]
        var f = Float(x)
        if x.isFinite, Double(f) != x {
            if abs(Double(f)) > abs(x) { f = f.sign == .minus ? f.nextUp : f.nextDown }  // (±Inf included)
            f = Float(bitPattern: f.bitPattern | 1)
        }
        dst[i] = f
    }
}

private func narrowFloats(_ src: UnsafePointer<Float>, to dst: UnsafeMutableRawPointer, _ to: DType, count: Int) {
    switch to {
    case .float32: dst.assumingMemoryBound(to: Float.self).update(from: src, count: count)
    case .bfloat16: BFloat16.narrow(src, to: dst.assumingMemoryBound(to: BFloat16.self), count: count)
    case .float16: Float16.narrow(src, to: dst.assumingMemoryBound(to: Float16.self), count: count)
    case .float64:
        let d = dst.assumingMemoryBound(to: Double.self)
        for i in 0..<count { d[i] = Double(src[i]) }
    }
}
