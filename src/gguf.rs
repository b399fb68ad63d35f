//! A bounds-checked reader of GGUF headers: magic, version, metadata, tensor table.
//!
//! candle's `gguf_file::Content::read` trusts the file: it divides by `general.alignment`
//! (0 panics), allocates whatever a count or a length says, and accepts a tensor table whose
//! entries are misaligned, overlap, or lie past the end of the file. This reader builds the
//! same [`gguf_file::Content`] but checks everything against the file's size first, and never
//! panics on any bytes ([`read_content`] is the entry point a fuzzer calls, through
//! [`crate::weights::GgufFile::validate_header`] on bytes in memory):
//!
//! - magic `GGUF`, version 2 or 3 (version 1, the pre-August-2023 format, is refused as
//!   llama.cpp refuses it; a byte-swapped version is named as a big-endian file);
//! - every count (metadata entries, tensors, array elements) and string length is at most
//!   what the rest of the file can hold, before anything is allocated;
//! - value types known; arrays of arrays refused (llama.cpp has none); keys and tensor
//!   names unique;
//! - `general.alignment` an integer, a power of two (GGUF's default is 32);
//! - per tensor: 1 to 4 dimensions, none 0, an element count that fits, a known GGML type
//!   that candle can read, a row length that is a whole number of blocks, an offset that is
//!   a multiple of the alignment, and a data range inside the file that overlaps no other
//!   tensor's.
//!
//! Messages describe bytes, never print them raw: names go through `{:?}` (control bytes
//! escaped).

use std::collections::HashMap;
use std::io::Read;

use candle_core::quantized::gguf_file::{self, Value, VersionedMagic};
use candle_core::quantized::GgmlDType;

/// GGUF's alignment when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml's `GGML_MAX_DIMS`.
pub const MAX_DIMS: u32 = 4;

/// A reader that knows how many bytes the file has left and refuses to read past them.
struct Bounded<'a, R: Read> {
    r: &'a mut R,
    pos: u64,
    len: u64,
}

type Res<T> = std::result::Result<T, String>;

impl<R: Read> Bounded<'_, R> {
    fn left(&self) -> u64 {
        self.len.saturating_sub(self.pos)
    }

    fn bytes(&mut self, n: u64, what: &dyn Fn() -> String) -> Res<Vec<u8>> {
        if n > self.left() {
            return Err(format!(
                "{} needs {n} bytes at byte {}, the file has only {} left (a truncated download or copy? re-download the file)",
                what(),
                self.pos,
                self.left()
            ));
        }
        let mut v = vec![0u8; n as usize];
        self.r
            .read_exact(&mut v)
            .map_err(|e| format!("reading {} at byte {}: {e}", what(), self.pos))?;
        self.pos += n;
        Ok(v)
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Res<[u8; N]> {
        let v = self.bytes(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(&v);
        Ok(a)
    }

    fn u8(&mut self, what: &dyn Fn() -> String) -> Res<u8> {
        Ok(self.array::<1>(what)?[0])
    }
    fn u16(&mut self, what: &dyn Fn() -> String) -> Res<u16> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }
    fn u32(&mut self, what: &dyn Fn() -> String) -> Res<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    fn u64(&mut self, what: &dyn Fn() -> String) -> Res<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A GGUF string (u64 length, bytes). Trailing NULs are dropped and invalid UTF-8 is
    /// replaced, as candle does.
    fn string(&mut self, what: &dyn Fn() -> String) -> Res<String> {
        let n = self.u64(what)?;
        let mut v = self.bytes(n, &|| format!("{} (a string of {n} bytes)", what()))?;
        while v.last() == Some(&0) {
            v.pop();
        }
        Ok(String::from_utf8_lossy(&v).into_owned())
    }
}

/// The GGUF value types: (id, name, smallest encoding in bytes).
fn value_type(id: u32) -> Option<(&'static str, u64)> {
    Some(match id {
        0 => ("u8", 1),
        1 => ("i8", 1),
        2 => ("u16", 2),
        3 => ("i16", 2),
        4 => ("u32", 4),
        5 => ("i32", 4),
        6 => ("f32", 4),
        7 => ("bool", 1),
        8 => ("string", 8),
        9 => ("array", 12),
        10 => ("u64", 8),
        11 => ("i64", 8),
        12 => ("f64", 8),
        _ => return None,
    })
}

/// The name of a value's type, for messages.
pub fn type_name(v: &Value) -> &'static str {
    match v {
        Value::U8(_) => "u8",
        Value::I8(_) => "i8",
        Value::U16(_) => "u16",
        Value::I16(_) => "i16",
        Value::U32(_) => "u32",
        Value::I32(_) => "i32",
        Value::U64(_) => "u64",
        Value::I64(_) => "i64",
        Value::F32(_) => "f32",
        Value::F64(_) => "f64",
        Value::Bool(_) => "bool",
        Value::String(_) => "string",
        Value::Array(_) => "array",
    }
}

fn read_value<R: Read>(r: &mut Bounded<R>, ty: u32, key: &str, in_array: bool) -> Res<Value> {
    let what = || format!("the value of metadata {key:?}");
    Ok(match ty {
        0 => Value::U8(r.u8(&what)?),
        1 => Value::I8(r.u8(&what)? as i8),
        2 => Value::U16(r.u16(&what)?),
        3 => Value::I16(r.u16(&what)? as i16),
        4 => Value::U32(r.u32(&what)?),
        5 => Value::I32(r.u32(&what)? as i32),
        6 => Value::F32(f32::from_bits(r.u32(&what)?)),
        7 => match r.u8(&what)? {
            0 => Value::Bool(false),
            1 => Value::Bool(true),
            b => return Err(format!("metadata {key:?}: a bool holds byte {b:#04x} (only 0 and 1 are booleans)")),
        },
        8 => Value::String(r.string(&what)?),
        9 if in_array => return Err(format!("metadata {key:?}: an array of arrays (not supported; llama.cpp has none)")),
        9 => {
            let ety = r.u32(&|| format!("the element type of metadata {key:?}"))?;
            let (ename, min) = value_type(ety)
                .ok_or_else(|| format!("metadata {key:?}: unknown array element type {ety} (GGUF types are 0 to 12)"))?;
            let n = r.u64(&|| format!("the length of metadata {key:?}"))?;
            if n.checked_mul(min).is_none_or(|b| b > r.left()) {
                return Err(format!(
                    "metadata {key:?}: an array of {n} {ename} values needs at least {} bytes, the file has only {} left (corrupt length, or a truncated file)",
                    n.saturating_mul(min),
                    r.left()
                ));
            }
            let mut v = Vec::with_capacity(n as usize);
            for _ in 0..n {
                v.push(read_value(r, ety, key, true)?);
            }
            Value::Array(v)
        }
        10 => Value::U64(r.u64(&what)?),
        11 => Value::I64(r.u64(&what)? as i64),
        12 => Value::F64(f64::from_bits(r.u64(&what)?)),
        t => return Err(format!("metadata {key:?}: unknown value type {t} (GGUF types are 0 to 12)")),
    })
}

/// A GGML type id -> the candle type, or why not.
fn ggml_type(id: u32) -> Res<GgmlDType> {
    Ok(match id {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        9 => GgmlDType::Q8_1,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        15 => GgmlDType::Q8K,
        30 => GgmlDType::BF16,
        16..=29 | 31..=41 => return Err(format!("GGML type {id} (an i-quant or ternary type) is not supported (supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1, Q2_K..Q8_K)")),
        _ => return Err(format!("unknown GGML type id {id}")),
    })
}

/// `general.alignment`, checked: an integer that is a power of two.
/// An integer metadata value of any width and sign, widened; `None` for other types.
pub fn as_integer(v: &Value) -> Option<i128> {
    Some(match v {
        Value::U8(x) => *x as i128,
        Value::I8(x) => *x as i128,
        Value::U16(x) => *x as i128,
        Value::I16(x) => *x as i128,
        Value::U32(x) => *x as i128,
        Value::I32(x) => *x as i128,
        Value::U64(x) => *x as i128,
        Value::I64(x) => *x as i128,
        _ => return None,
    })
}

fn alignment(metadata: &HashMap<String, Value>) -> Res<u64> {
    let v = match metadata.get("general.alignment") {
        None => return Ok(DEFAULT_ALIGNMENT),
        Some(v) => v,
    };
    let Some(a) = as_integer(v) else {
        return Err(format!("metadata general.alignment has type {}, expected an integer (u32)", type_name(v)));
    };
    if a <= 0 || a > (1i128 << 62) || (a & (a - 1)) != 0 {
        return Err(format!(
            "metadata general.alignment = {a}: the alignment must be a power of two (GGUF's default is {DEFAULT_ALIGNMENT}); the file is corrupt or was written by a broken converter"
        ));
    }
    Ok(a as u64)
}

/// Reads and checks a GGUF header from `r`, a file of `file_len` bytes read from its start.
/// The error is a message naming the key or tensor (the caller adds the file).
pub fn read_content<R: Read>(r: &mut R, file_len: u64) -> Res<gguf_file::Content> {
    let mut r = Bounded { r, pos: 0, len: file_len };
    let magic = r.array::<4>(&|| "the GGUF magic".into())?;
    if &magic != b"GGUF" {
        return Err(format!(
            "not a GGUF file: it starts with {} (expected the magic `GGUF`)",
            magic.iter().map(|b| format!("{b:#04x}")).collect::<Vec<_>>().join(" ")
        ));
    }
    let version = r.u32(&|| "the GGUF version".into())?;
    let magic = match version {
        2 => VersionedMagic::GgufV2,
        3 => VersionedMagic::GgufV3,
        1 => {
            return Err("GGUF version 1 is not supported (the format before August 2023, which llama.cpp no longer reads either): re-convert the model with a current llama.cpp".into())
        }
        v if matches!(v.swap_bytes(), 1..=3) => {
            return Err(format!(
                "GGUF version {v} is {} byte-swapped: a big-endian GGUF file, which this engine does not read (convert it on a little-endian machine)",
                v.swap_bytes()
            ))
        }
        v => return Err(format!("GGUF version {v} is not supported (this engine reads versions 2 and 3)")),
    };
    let n_tensors = r.u64(&|| "the tensor count".into())?;
    let n_kv = r.u64(&|| "the metadata count".into())?;
    // A metadata entry takes at least 13 bytes (key length, type, one byte of value); a
    // tensor entry at least 32 (name length, 1 dimension, type, offset).
    for (n, min, what) in [(n_kv, 13u64, "metadata entries"), (n_tensors, 32, "tensors")] {
        if n.checked_mul(min).is_none_or(|b| b > r.left()) {
            return Err(format!(
                "the header says {n} {what}, the file has room for at most {} (corrupt count, or a truncated file)",
                r.left() / min
            ));
        }
    }
    let mut metadata = HashMap::new();
    for i in 0..n_kv {
        let key = r.string(&|| format!("the key of metadata entry {i}"))?;
        let ty = r.u32(&|| format!("the type of metadata {key:?}"))?;
        let value = read_value(&mut r, ty, &key, false)?;
        if metadata.insert(key.clone(), value).is_some() {
            return Err(format!("metadata {key:?} appears twice"));
        }
    }
    let align = alignment(&metadata)?;

    // (name, ggml dims innermost first, type, offset, size in bytes)
    let mut infos: Vec<(String, GgmlDType, Vec<usize>, u64, u64)> = Vec::with_capacity(n_tensors as usize);
    for i in 0..n_tensors {
        let name = r.string(&|| format!("the name of tensor {i}"))?;
        let nd = r.u32(&|| format!("the dimension count of tensor {name:?}"))?;
        if !(1..=MAX_DIMS).contains(&nd) {
            return Err(format!("tensor {name:?} has {nd} dimensions (GGML tensors have 1 to {MAX_DIMS})"));
        }
        let mut dims = Vec::with_capacity(nd as usize);
        for _ in 0..nd {
            dims.push(r.u64(&|| format!("the dimensions of tensor {name:?}"))?);
        }
        let ty = r.u32(&|| format!("the type of tensor {name:?}"))?;
        let offset = r.u64(&|| format!("the data offset of tensor {name:?}"))?;
        let dt = ggml_type(ty).map_err(|e| format!("tensor {name:?}: {e}"))?;
        if dims.contains(&0) {
            return Err(format!("tensor {name:?} has a dimension of size 0 (dimensions {dims:?}, innermost first)"));
        }
        let elems = dims
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .filter(|&e| e <= i64::MAX as u64 && usize::try_from(e).is_ok())
            .ok_or_else(|| format!("tensor {name:?}: dimensions {dims:?} have more elements than fit in memory"))?;
        let (bs, ts) = (dt.block_size() as u64, dt.type_size() as u64);
        if dims[0] % bs != 0 {
            return Err(format!(
                "tensor {name:?} ({dt:?}): its row length {} is not a multiple of {dt:?}'s block size {bs}",
                dims[0]
            ));
        }
        let size = (elems / bs)
            .checked_mul(ts)
            .ok_or_else(|| format!("tensor {name:?}: dimensions {dims:?} have more bytes than fit in memory"))?;
        if offset % align != 0 {
            return Err(format!(
                "tensor {name:?}: data offset {offset} is not a multiple of the alignment {align} (general.alignment): the tensor table is corrupt"
            ));
        }
        let dims: Vec<usize> = dims.iter().map(|&d| d as usize).collect();
        infos.push((name, dt, dims, offset, size));
    }
    let data_start = r
        .pos
        .checked_next_multiple_of(align)
        .ok_or_else(|| format!("the tensor data section's start overflows with alignment {align}"))?;
    let data_len = file_len.saturating_sub(data_start);
    let mut by_offset: Vec<usize> = (0..infos.len()).collect();
    by_offset.sort_by_key(|&i| (infos[i].3, infos[i].4));
    let mut prev: Option<usize> = None;
    for &i in &by_offset {
        let (name, dt, _, offset, size) = &infos[i];
        let end = offset.checked_add(*size);
        if end.is_none_or(|e| e > data_len) {
            return Err(format!(
                "tensor {name:?} ({dt:?}, {size} bytes at offset {offset} of the data section, which starts at byte {data_start}) extends past the end of the file: only {} bytes left (a truncated download or copy? re-download the file)",
                data_len.saturating_sub(*offset)
            ));
        }
        if let Some(p) = prev {
            let (pname, _, _, poff, psize) = &infos[p];
            if poff + psize > *offset {
                return Err(format!(
                    "tensors {pname:?} (bytes {poff}..{} of the data section) and {name:?} (bytes {offset}..{}) overlap: the tensor table is corrupt",
                    poff + psize,
                    offset + size
                ));
            }
        }
        prev = Some(i);
    }
    let mut tensor_infos = HashMap::with_capacity(infos.len());
    for (name, dt, mut dims, offset, _) in infos {
        // candle's shapes are outermost first.
        dims.reverse();
        let info = gguf_file::TensorInfo { ggml_dtype: dt, shape: candle_core::Shape::from(dims), offset };
        if tensor_infos.insert(name.clone(), info).is_some() {
            return Err(format!("tensor {name:?} appears twice in the tensor table"));
        }
    }
    Ok(gguf_file::Content { magic, metadata, tensor_infos, tensor_data_offset: data_start })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(version: u32, kv: &[(&str, u32, Vec<u8>)], tensors: &[(&str, &[u64], u32, u64)]) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(version.to_le_bytes());
        b.extend((tensors.len() as u64).to_le_bytes());
        b.extend((kv.len() as u64).to_le_bytes());
        for (k, ty, v) in kv {
            b.extend((k.len() as u64).to_le_bytes());
            b.extend(k.as_bytes());
            b.extend(ty.to_le_bytes());
            b.extend(v);
        }
        for (n, dims, ty, off) in tensors {
            b.extend((n.len() as u64).to_le_bytes());
            b.extend(n.as_bytes());
            b.extend((dims.len() as u32).to_le_bytes());
            for d in *dims {
                b.extend(d.to_le_bytes());
            }
            b.extend(ty.to_le_bytes());
            b.extend(off.to_le_bytes());
        }
        b
    }

    fn read(b: &[u8]) -> Res<gguf_file::Content> {
        read_content(&mut std::io::Cursor::new(b), b.len() as u64)
    }

    fn with_data(mut b: Vec<u8>, data: usize) -> Vec<u8> {
        b.resize(b.len().next_multiple_of(32) + data, 0);
        b
    }

    #[test]
    fn a_valid_header_reads_like_candle() {
        let b = with_data(header(3, &[("a", 4, 7u32.to_le_bytes().to_vec())], &[("t", &[4, 2], 0, 0), ("u", &[8], 0, 32)]), 64);
        let c = read(&b).unwrap();
        assert_eq!(c.tensor_infos["t"].shape.dims(), &[2, 4]);
        assert_eq!(c.tensor_data_offset % 32, 0);
        assert_eq!(c.metadata["a"].to_u32().unwrap(), 7);
    }

    #[test]
    fn alignment_zero_or_not_a_power_of_two_is_refused() {
        for a in [0u32, 7, 48] {
            let b = with_data(header(3, &[("general.alignment", 4, a.to_le_bytes().to_vec())], &[("t", &[8], 0, 0)]), 32);
            let e = read(&b).unwrap_err();
            assert!(e.contains("general.alignment") && e.contains("power of two"), "{e}");
        }
    }

    #[test]
    fn misaligned_overlapping_and_out_of_file_tensors_are_named() {
        let e = read(&with_data(header(3, &[], &[("t", &[8], 0, 4)]), 64)).unwrap_err();
        assert!(e.contains("\"t\"") && e.contains("not a multiple"), "{e}");
        let e = read(&with_data(header(3, &[], &[("t", &[16], 0, 0), ("u", &[8], 0, 32)]), 96)).unwrap_err();
        assert!(e.contains("\"t\"") && e.contains("\"u\"") && e.contains("overlap"), "{e}");
        let e = read(&with_data(header(3, &[], &[("t", &[8], 0, 64)]), 32)).unwrap_err();
        assert!(e.contains("\"t\"") && e.contains("past the end"), "{e}");
    }

    #[test]
    fn huge_counts_and_lengths_are_refused_before_allocating() {
        let mut b = header(3, &[], &[]);
        b[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(read(&b).unwrap_err().contains("room for at most"));
        let b = header(3, &[("k", 9, [8u32.to_le_bytes().to_vec(), u64::MAX.to_le_bytes().to_vec()].concat())], &[]);
        assert!(read(&b).unwrap_err().contains("array of"));
        let mut b = header(3, &[("k", 8, [5u64.to_le_bytes().to_vec(), b"hello".to_vec()].concat())], &[]);
        b[24..32].copy_from_slice(&(u64::MAX - 3).to_le_bytes());
        assert!(read(&b).unwrap_err().contains("only"));
    }

    #[test]
    fn version_1_and_big_endian_files_say_what_they_are() {
        assert!(read(&header(1, &[], &[])).unwrap_err().contains("version 1"));
        assert!(read(&header(3u32.swap_bytes(), &[], &[])).unwrap_err().contains("big-endian"));
        let e = read(b"\x01\x02GG\0\0\0\0").unwrap_err();
        assert!(e.contains("0x01 0x02") && !e.contains('\u{1}'), "{e}");
    }

    #[test]
    fn control_bytes_in_names_are_escaped() {
        let e = read(&header(3, &[], &[("a\u{1}b", &[0], 0, 0)])).unwrap_err();
        assert!(e.contains("a\\u{1}b") && !e.contains('\u{1}'), "{e}");
    }

    #[test]
    fn every_prefix_of_a_valid_file_is_an_error_not_a_panic() {
        let b = with_data(header(3, &[("a", 9, [8u32.to_le_bytes().to_vec(), 1u64.to_le_bytes().to_vec(), 1u64.to_le_bytes().to_vec(), b"x".to_vec()].concat())], &[("t", &[32], 8, 0)]), 34);
        read(&b).unwrap();
        for cut in 0..b.len() {
            assert!(read(&b[..cut]).is_err(), "cut {cut}");
        }
    }
}
