//! Dominance (Pareto) pruning and lower-convex-hull pruning of one item's (cost, value) points.

/// Indices of the Pareto-optimal points, sorted by increasing cost with strictly decreasing
/// value. Among points of equal cost and value the lowest index is kept (deterministic).
pub fn pareto_front(points: &[(u64, f64)]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..points.len()).collect();
    order.sort_by(|&a, &b| {
        let (ca, va) = points[a];
        let (cb, vb) = points[b];
        ca.cmp(&cb).then(va.total_cmp(&vb)).then(a.cmp(&b))
    });
    let mut front = Vec::with_capacity(order.len());
    let mut best = f64::INFINITY;
    for i in order {
        if points[i].1 < best {
            best = points[i].1;
            front.push(i);
        }
    }
    front
}

/// Indices of the vertices of the lower convex hull of the Pareto front, from the cheapest point
/// to the lowest-value point, with strictly increasing (ever less negative) slopes (collinear points are
/// dropped). These are the only points an LP / Lagrangian relaxation can choose.
pub fn lower_hull(points: &[(u64, f64)]) -> Vec<usize> {
    hull_of_front(points, &pareto_front(points))
}

/// The lower hull over an already computed Pareto front (indices sorted by cost).
pub fn hull_of_front(points: &[(u64, f64)], front: &[usize]) -> Vec<usize> {
    let mut hull: Vec<usize> = Vec::with_capacity(front.len());
    for &c in front {
        while hull.len() >= 2 {
            let a = hull[hull.len() - 2];
            let b = hull[hull.len() - 1];
            if !strictly_below_chord(points[a], points[b], points[c]) {
                hull.pop();
            } else {
                break;
            }
        }
        hull.push(c);
    }
    hull
}

/// True when b lies strictly below the chord from a to c (a.cost < b.cost < c.cost).
fn strictly_below_chord(a: (u64, f64), b: (u64, f64), c: (u64, f64)) -> bool {
    let (wa, va) = (a.0 as f64, a.1);
    let dwb = b.0 as f64 - wa;
    let dwc = c.0 as f64 - wa;
    // slope(a,b) < slope(a,c) (both negative) ⇔ (vb−va)·dwc < (vc−va)·dwb.
    (b.1 - va) * dwc < (c.1 - va) * dwb
}
