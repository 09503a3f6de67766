//! Pareto and lower-hull pruning: properties against direct definitions.
use exl2rs_core::alloc::{lower_hull, pareto_front};
use proptest::prelude::*;

fn points() -> impl Strategy<Value = Vec<(u64, f64)>> {
    prop::collection::vec((0u64..50, (0u32..40).prop_map(|v| v as f64 * 0.5)), 1..25)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn pareto_front_is_exactly_the_non_dominated_set(pts in points()) {
        let front = pareto_front(&pts);
        // Sorted by cost, strictly decreasing value.
        for w in front.windows(2) {
            prop_assert!(pts[w[0]].0 < pts[w[1]].0 && pts[w[0]].1 > pts[w[1]].1);
        }
        for (i, &(c, v)) in pts.iter().enumerate() {
            let dominated = pts.iter().enumerate().any(|(j, &(c2, v2))| {
                j != i && c2 <= c && v2 <= v && (c2 < c || v2 < v || j < i)
            });
            prop_assert_eq!(front.contains(&i), !dominated, "point {} {:?}", i, (c, v));
        }
    }

    #[test]
    fn lower_hull_is_convex_and_below_every_point(pts in points()) {
        let hull = lower_hull(&pts);
        let front = pareto_front(&pts);
        prop_assert_eq!(hull[0], front[0]);
        prop_assert_eq!(*hull.last().unwrap(), *front.last().unwrap());
        // Slopes strictly increasing (convex), all negative.
        let slope = |a: usize, b: usize| (pts[b].1 - pts[a].1) / (pts[b].0 as f64 - pts[a].0 as f64);
        for w in hull.windows(3) {
            prop_assert!(slope(w[0], w[1]) < slope(w[1], w[2]));
        }
        // No point lies strictly below the hull's piecewise-linear curve.
        for &(c, v) in &pts {
            for w in hull.windows(2) {
                let (a, b) = (pts[w[0]], pts[w[1]]);
                if a.0 <= c && c <= b.0 {
                    let y = a.1 + (b.1 - a.1) * (c - a.0) as f64 / (b.0 - a.0) as f64;
                    prop_assert!(v >= y - 1e-9);
                }
            }
        }
    }
}
