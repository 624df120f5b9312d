//! The GGUF data model: metadata value types, values, ggml tensor types with
//! their block layout, and tensor descriptions.

use std::fmt;

/// Type tag of a metadata value, as stored in the file (`u32`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum ValueType {
    /// `u8`.
    U8 = 0,
    /// `i8`.
    I8 = 1,
    /// `u16`.
    U16 = 2,
    /// `i16`.
    I16 = 3,
    /// `u32`.
    U32 = 4,
    /// `i32`.
    I32 = 5,
    /// `f32`.
    F32 = 6,
    /// Boolean stored as one byte, 0 or 1.
    Bool = 7,
    /// UTF-8 string: `u64` length then bytes.
    String = 8,
    /// Array: element type (`u32`), count (`u64`), elements.
    Array = 9,
    /// `u64`.
    U64 = 10,
    /// `i64`.
    I64 = 11,
    /// `f64`.
    F64 = 12,
}

impl ValueType {
    /// The type for a stored id, or `None` for an unknown id.
    pub fn from_id(id: u32) -> Option<ValueType> {
        use ValueType::*;
        Some(match id {
            0 => U8,
            1 => I8,
            2 => U16,
            3 => I16,
            4 => U32,
            5 => I32,
            6 => F32,
            7 => Bool,
            8 => String,
            9 => Array,
            10 => U64,
            11 => I64,
            12 => F64,
            _ => return None,
        })
    }

    /// The id stored in the file.
    pub fn id(self) -> u32 {
        self as u32
    }

    /// Lower-case name as gguf-py and llama.cpp print it (`u8`, `string`, ...).
    pub fn name(self) -> &'static str {
        use ValueType::*;
        match self {
            U8 => "u8",
            I8 => "i8",
            U16 => "u16",
            I16 => "i16",
            U32 => "u32",
            I32 => "i32",
            F32 => "f32",
            Bool => "bool",
            String => "string",
            Array => "array",
            U64 => "u64",
            I64 => "i64",
            F64 => "f64",
        }
    }

    /// The fewest bytes one value of this type occupies in a file
    /// (a string's length field, an array's type and count fields).
    pub fn min_encoded_size(self) -> u64 {
        use ValueType::*;
        match self {
            U8 | I8 | Bool => 1,
            U16 | I16 => 2,
            U32 | I32 | F32 => 4,
            U64 | I64 | F64 | String => 8,
            Array => 12,
        }
    }
}

impl fmt::Display for ValueType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `u8`.
    U8(u8),
    /// `i8`.
    I8(i8),
    /// `u16`.
    U16(u16),
    /// `i16`.
    I16(i16),
    /// `u32`.
    U32(u32),
    /// `i32`.
    I32(i32),
    /// `f32`.
    F32(f32),
    /// Boolean.
    Bool(bool),
    /// UTF-8 string.
    String(String),
    /// Array of values of one type (arrays may nest).
    Array(Array),
    /// `u64`.
    U64(u64),
    /// `i64`.
    I64(i64),
    /// `f64`.
    F64(f64),
}

/// An array value: every element has type `elem_type`.
#[derive(Debug, Clone, PartialEq)]
pub struct Array {
    /// The element type, kept even when the array is empty.
    pub elem_type: ValueType,
    /// The elements, in file order.
    pub values: Vec<Value>,
}

impl Value {
    /// The value's type tag.
    pub fn value_type(&self) -> ValueType {
        match self {
            Value::U8(_) => ValueType::U8,
            Value::I8(_) => ValueType::I8,
            Value::U16(_) => ValueType::U16,
            Value::I16(_) => ValueType::I16,
            Value::U32(_) => ValueType::U32,
            Value::I32(_) => ValueType::I32,
            Value::F32(_) => ValueType::F32,
            Value::Bool(_) => ValueType::Bool,
            Value::String(_) => ValueType::String,
            Value::Array(_) => ValueType::Array,
            Value::U64(_) => ValueType::U64,
            Value::I64(_) => ValueType::I64,
            Value::F64(_) => ValueType::F64,
        }
    }

    /// Any unsigned integer, or a signed one that is not negative.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any integer that fits in an `i64`.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => i64::try_from(v).ok(),
            Value::I8(v) => Some(v.into()),
            Value::I16(v) => Some(v.into()),
            Value::I32(v) => Some(v.into()),
            Value::I64(v) => Some(v),
            _ => None,
        }
    }

    /// Any numeric value as `f64` (64-bit integers may round).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::I8(v) => Some(v.into()),
            Value::I16(v) => Some(v.into()),
            Value::I32(v) => Some(v.into()),
            Value::U64(v) => Some(v as f64),
            Value::I64(v) => Some(v as f64),
            _ => None,
        }
    }

    /// The string, if this is a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// The boolean, if this is a boolean.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// The array, if this is an array.
    pub fn as_array(&self) -> Option<&Array> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

macro_rules! tensor_types {
    ($( $(#[$doc:meta])* $name:ident = $id:literal, $label:literal, $block:literal, $size:literal; )*) => {
        /// A ggml tensor element type with its block layout. Every type a
        /// current llama.cpp writes is listed so that real quantized files
        /// parse; removed ids (4, 5, 31–33, 36–38) are rejected.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[allow(non_camel_case_types)]
        pub enum TensorType {
            $( $(#[$doc])* $name, )*
        }

        impl TensorType {
            /// Every known type, in id order.
            pub const ALL: &'static [TensorType] = &[$(TensorType::$name,)*];

            /// The id stored in the file.
            pub fn id(self) -> u32 {
                match self { $(TensorType::$name => $id,)* }
            }

            /// The name llama.cpp prints (`F32`, `Q4_0`, ...).
            pub fn name(self) -> &'static str {
                match self { $(TensorType::$name => $label,)* }
            }

            /// Elements per block (1 for plain types).
            pub fn block_size(self) -> u64 {
                match self { $(TensorType::$name => $block,)* }
            }

            /// Bytes per block.
            pub fn type_size(self) -> u64 {
                match self { $(TensorType::$name => $size,)* }
            }

            fn from_known_id(id: u32) -> Option<TensorType> {
                match id { $($id => Some(TensorType::$name),)* _ => None }
            }
        }
    };
}

tensor_types! {
    /// 32-bit float.
    F32 = 0, "F32", 1, 4;
    /// IEEE half.
    F16 = 1, "F16", 1, 2;
    /// 4-bit, scale per 32.
    Q4_0 = 2, "Q4_0", 32, 18;
    /// 4-bit, scale and min per 32.
    Q4_1 = 3, "Q4_1", 32, 20;
    /// 5-bit, scale per 32.
    Q5_0 = 6, "Q5_0", 32, 22;
    /// 5-bit, scale and min per 32.
    Q5_1 = 7, "Q5_1", 32, 24;
    /// 8-bit, scale per 32.
    Q8_0 = 8, "Q8_0", 32, 34;
    /// 8-bit, scale and sum per 32 (ggml's 36-byte block).
    Q8_1 = 9, "Q8_1", 32, 36;
    /// k-quant 2-bit.
    Q2_K = 10, "Q2_K", 256, 84;
    /// k-quant 3-bit.
    Q3_K = 11, "Q3_K", 256, 110;
    /// k-quant 4-bit.
    Q4_K = 12, "Q4_K", 256, 144;
    /// k-quant 5-bit.
    Q5_K = 13, "Q5_K", 256, 176;
    /// k-quant 6-bit.
    Q6_K = 14, "Q6_K", 256, 210;
    /// k-quant 8-bit.
    Q8_K = 15, "Q8_K", 256, 292;
    /// i-quant.
    IQ2_XXS = 16, "IQ2_XXS", 256, 66;
    /// i-quant.
    IQ2_XS = 17, "IQ2_XS", 256, 74;
    /// i-quant.
    IQ3_XXS = 18, "IQ3_XXS", 256, 98;
    /// i-quant.
    IQ1_S = 19, "IQ1_S", 256, 50;
    /// i-quant, non-linear 4-bit.
    IQ4_NL = 20, "IQ4_NL", 32, 18;
    /// i-quant.
    IQ3_S = 21, "IQ3_S", 256, 110;
    /// i-quant.
    IQ2_S = 22, "IQ2_S", 256, 82;
    /// i-quant.
    IQ4_XS = 23, "IQ4_XS", 256, 136;
    /// 8-bit integer.
    I8 = 24, "I8", 1, 1;
    /// 16-bit integer.
    I16 = 25, "I16", 1, 2;
    /// 32-bit integer.
    I32 = 26, "I32", 1, 4;
    /// 64-bit integer.
    I64 = 27, "I64", 1, 8;
    /// 64-bit float.
    F64 = 28, "F64", 1, 8;
    /// i-quant.
    IQ1_M = 29, "IQ1_M", 256, 56;
    /// bfloat16.
    BF16 = 30, "BF16", 1, 2;
    /// ternary.
    TQ1_0 = 34, "TQ1_0", 256, 54;
    /// ternary.
    TQ2_0 = 35, "TQ2_0", 256, 66;
    /// microscaling fp4.
    MXFP4 = 39, "MXFP4", 32, 17;
    /// nvidia fp4.
    NVFP4 = 40, "NVFP4", 64, 36;
    /// 1-bit.
    Q1_0 = 41, "Q1_0", 128, 18;
}

/// Why a tensor type id was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TypeIdError {
    /// The id belonged to a type ggml has removed (its name given).
    Removed(&'static str),
    /// The id is not known.
    Unknown,
}

impl TensorType {
    /// The type for a stored id.
    pub fn from_id(id: u32) -> Result<TensorType, TypeIdError> {
        if let Some(t) = TensorType::from_known_id(id) {
            return Ok(t);
        }
        Err(match id {
            4 => TypeIdError::Removed("Q4_2"),
            5 => TypeIdError::Removed("Q4_3"),
            31 => TypeIdError::Removed("Q4_0_4_4"),
            32 => TypeIdError::Removed("Q4_0_4_8"),
            33 => TypeIdError::Removed("Q4_0_8_8"),
            36 => TypeIdError::Removed("IQ4_NL_4_4"),
            37 => TypeIdError::Removed("IQ4_NL_4_8"),
            38 => TypeIdError::Removed("IQ4_NL_8_8"),
            _ => TypeIdError::Unknown,
        })
    }

    /// Bytes taken by a tensor of this type and these dims, or `None` when
    /// a dimension is zero, `dims[0]` is not a whole number of blocks, or
    /// the count or size overflows (`i64` range, as ggml uses signed sizes).
    pub fn byte_size(self, dims: &[u64]) -> Option<u64> {
        let mut n: u64 = 1;
        for &d in dims {
            if d == 0 || d > i64::MAX as u64 {
                return None;
            }
            n = n.checked_mul(d).filter(|&n| n <= i64::MAX as u64)?;
        }
        let first = dims.first().copied().unwrap_or(1);
        if first % self.block_size() != 0 {
            return None;
        }
        (n / self.block_size())
            .checked_mul(self.type_size())
            .filter(|&b| b <= i64::MAX as u64)
    }
}

impl fmt::Display for TensorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A tensor's description from the file's tensor-info table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// Tensor name (`blk.0.weight`).
    pub name: String,
    /// Dimensions in ggml order: `dims[0]` varies fastest (a row's length).
    pub dims: Vec<u64>,
    /// Element type.
    pub ttype: TensorType,
    /// Offset of the first byte relative to the data section.
    pub offset: u64,
    /// Size in bytes.
    pub size: u64,
}

impl TensorInfo {
    /// Number of elements (product of dims; 1 for zero dims).
    pub fn n_elements(&self) -> u64 {
        // Validated at parse time: the product fits in an i64.
        self.dims.iter().product()
    }
}
