//! Just enough complex arithmetic to evaluate answers at sample points: principal branches, so that
//! `\sqrt{x-5}` or `(-8)^{1/3}` have a value on both sides of a comparison.
use std::ops::{Add, Div, Mul, Neg, Sub};

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Complex {
    pub re: f64,
    pub im: f64,
}

impl Complex {
    pub const ZERO: Complex = Complex { re: 0.0, im: 0.0 };
    pub const ONE: Complex = Complex { re: 1.0, im: 0.0 };

    pub fn new(re: f64, im: f64) -> Self {
        Complex { re, im }
    }

    pub fn real(re: f64) -> Self {
        Complex { re, im: 0.0 }
    }

    pub fn abs(self) -> f64 {
        self.re.hypot(self.im)
    }

    pub fn is_finite(self) -> bool {
        self.re.is_finite() && self.im.is_finite()
    }

    /// Real up to rounding noise relative to its size.
    pub fn is_real(self) -> bool {
        self.im.abs() <= 1e-12 * self.re.abs().max(1.0)
    }

    /// The value as an integer, when it is one (to rounding).
    pub fn as_integer(self) -> Option<i64> {
        let rounded = self.re.round();
        let is_integer = self.is_real()
            && rounded.abs() < 1e15
            && (self.re - rounded).abs() <= 1e-9 * rounded.abs().max(1.0);
        is_integer.then_some(rounded as i64)
    }

    pub fn exp(self) -> Self {
        let scale = self.re.exp();
        Complex::new(scale * self.im.cos(), scale * self.im.sin())
    }

    /// Principal logarithm.
    pub fn ln(self) -> Self {
        Complex::new(self.abs().ln(), self.im.atan2(self.re))
    }

    /// Principal power; exact repeated multiplication for integer exponents.
    pub fn pow(self, exponent: Complex) -> Self {
        if let Some(n) = exponent.as_integer().filter(|n| n.unsigned_abs() <= 64) {
            let mut result = Complex::ONE;
            for _ in 0..n.unsigned_abs() {
                result = result * self;
            }
            return if n < 0 { Complex::ONE / result } else { result };
        }
        if self.is_real() && exponent.is_real() && self.re >= 0.0 {
            return Complex::real(self.re.powf(exponent.re));
        }
        if self == Complex::ZERO {
            return if exponent.re > 0.0 {
                Complex::ZERO
            } else {
                Complex::real(f64::NAN)
            };
        }
        (exponent * self.ln()).exp()
    }

    pub fn sin(self) -> Self {
        Complex::new(
            self.re.sin() * self.im.cosh(),
            self.re.cos() * self.im.sinh(),
        )
    }

    pub fn cos(self) -> Self {
        Complex::new(
            self.re.cos() * self.im.cosh(),
            -self.re.sin() * self.im.sinh(),
        )
    }

    pub fn sinh(self) -> Self {
        (self.exp() - (-self).exp()) / Complex::real(2.0)
    }

    pub fn cosh(self) -> Self {
        (self.exp() + (-self).exp()) / Complex::real(2.0)
    }
}

impl Add for Complex {
    type Output = Complex;
    fn add(self, other: Complex) -> Complex {
        Complex::new(self.re + other.re, self.im + other.im)
    }
}

impl Sub for Complex {
    type Output = Complex;
    fn sub(self, other: Complex) -> Complex {
        Complex::new(self.re - other.re, self.im - other.im)
    }
}

impl Mul for Complex {
    type Output = Complex;
    fn mul(self, other: Complex) -> Complex {
        if self.im == 0.0 && other.im == 0.0 {
            return Complex::real(self.re * other.re);
        }
        Complex::new(
            self.re * other.re - self.im * other.im,
            self.re * other.im + self.im * other.re,
        )
    }
}

impl Div for Complex {
    type Output = Complex;
    fn div(self, other: Complex) -> Complex {
        if self.im == 0.0 && other.im == 0.0 {
            return Complex::real(self.re / other.re);
        }
        let denominator = other.re * other.re + other.im * other.im;
        Complex::new(
            (self.re * other.re + self.im * other.im) / denominator,
            (self.im * other.re - self.re * other.im) / denominator,
        )
    }
}

impl Neg for Complex {
    type Output = Complex;
    fn neg(self) -> Complex {
        Complex::new(-self.re, -self.im)
    }
}
