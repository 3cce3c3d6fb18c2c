//! The robust statistics the checker is built from: medians, mean and spread, a least-squares
//! slope, a running median.

/// The median of `values` (the mean of the middle two for an even count); `None` when empty.
pub fn median(values: &[f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    Some(if sorted.len() % 2 == 1 {
        sorted[mid]
    } else {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    })
}

/// The `q`-quantile of `values` (0 ≤ q ≤ 1), the nearest rank; `None` when empty.
pub fn quantile(values: &[f64], q: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = (q.clamp(0.0, 1.0) * (sorted.len() - 1) as f64).round() as usize;
    Some(sorted[rank])
}

/// The per-channel median of colours.
pub fn median_rgb(colors: &[[f64; 3]]) -> Option<[f64; 3]> {
    let channel = |c: usize| median(&colors.iter().map(|rgb| rgb[c]).collect::<Vec<_>>());
    Some([channel(0)?, channel(1)?, channel(2)?])
}

pub fn mean(values: &[f64]) -> Option<f64> {
    (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
}

/// Population standard deviation; `None` when empty.
pub fn std_dev(values: &[f64]) -> Option<f64> {
    let m = mean(values)?;
    Some((values.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / values.len() as f64).sqrt())
}

/// The slope of the least-squares line through `(x, y)` points; `None` for fewer than two
/// distinct `x`.
pub fn slope(points: &[(f64, f64)]) -> Option<f64> {
    let xs: Vec<f64> = points.iter().map(|p| p.0).collect();
    let ys: Vec<f64> = points.iter().map(|p| p.1).collect();
    let (mx, my) = (mean(&xs)?, mean(&ys)?);
    let sxx: f64 = xs.iter().map(|x| (x - mx) * (x - mx)).sum();
    if sxx == 0.0 {
        return None;
    }
    let sxy: f64 = points.iter().map(|(x, y)| (x - mx) * (y - my)).sum();
    Some(sxy / sxx)
}

/// Each value replaced by the median of the `window` values centred on it, which removes
/// isolated outliers without shifting steps. Near the ends the window shrinks symmetrically, and
/// each end value becomes the median of itself, its smoothed neighbour and the line through the
/// next two smoothed values (a form of Tukey's end-point rule), so a straight ramp comes through
/// exactly and a wild first or last value is still replaced.
pub fn running_median(values: &[f64], window: usize) -> Vec<f64> {
    let n = values.len();
    let half = window / 2;
    let mut smoothed: Vec<f64> = (0..n)
        .map(|i| {
            let reach = half.min(i).min(n - 1 - i);
            median(&values[i - reach..=i + reach]).expect("the window holds the value itself")
        })
        .collect();
    if n >= 3 {
        let end = |value: f64, next: f64, after: f64| {
            median(&[value, next, 2.0 * next - after]).expect("three values")
        };
        smoothed[0] = end(values[0], smoothed[1], smoothed[2]);
        smoothed[n - 1] = end(values[n - 1], smoothed[n - 2], smoothed[n - 3]);
    }
    smoothed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_means_and_slopes() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[]), None);
        assert_eq!(
            median_rgb(&[[1.0, 5.0, 9.0], [3.0, 4.0, 8.0], [2.0, 6.0, 7.0]]),
            Some([2.0, 5.0, 8.0])
        );
        assert_eq!(
            std_dev(&[2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]),
            Some(2.0)
        );
        let line: Vec<(f64, f64)> = (0..10).map(|i| (i as f64, 3.0 - 0.5 * i as f64)).collect();
        assert!((slope(&line).unwrap() + 0.5).abs() < 1e-12);
        assert_eq!(slope(&[(1.0, 2.0), (1.0, 3.0)]), None);
    }

    #[test]
    fn running_median_drops_a_spike_and_keeps_a_ramp() {
        let smoothed = running_median(&[0.0, 1.0, 2.0, 30.0, 4.0, 5.0, 6.0], 5);
        assert_eq!(smoothed, vec![0.0, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0]);
        let ramp: Vec<f64> = (0..8).map(|i| 3.0 - 0.5 * f64::from(i)).collect();
        assert_eq!(running_median(&ramp, 5), ramp);
        // a wild first value is replaced by the line through its neighbours
        let mut wild = ramp.clone();
        wild[0] = 40.0;
        assert_eq!(running_median(&wild, 5), ramp);
    }
}
